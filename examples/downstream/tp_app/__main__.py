from tp_app import main

raise SystemExit(main())
