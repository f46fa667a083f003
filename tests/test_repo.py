"""Repository hygiene: README's set-up commands are the ones CI runs."""
import re


def test_ci_runs_the_readme_commands(root):
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"## Set up\n.*?```sh\n(.*?)\n```.*?```sh\n(.*?)\n```", readme, re.S)
    assert blocks, "README must have the install and test commands under '## Set up'"
    install, tests = blocks[0]
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci
