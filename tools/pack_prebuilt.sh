#!/usr/bin/env bash
# Builds every spec on this (CPU, x86-64) machine and packs the op libraries for the GPU machine into
# .prebuilt/ops.tar.xz (ignored by git): carry .prebuilt with the device call and the lab (python3 -m bench)
# unpacks it instead of building there (minutes of device time saved per fresh machine).
# The libraries link TVM-FFI dynamically: carry the apache-tvm-ffi wheel of the version built against
# (build.json's tvm_ffi), e.g. ../shared/device/prepare-wheels.sh ... apache-tvm-ffi==<that version>.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.prebuilt/' .git/info/exclude 2>/dev/null || echo '/.prebuilt/' >> .git/info/exclude
mkdir -p .prebuilt
# BASE=<rev>: also that revision's op package (Python package and libraries) into .prebuilt/base.tar.xz, for
# `python3 -m bench ab` (the same script on both builds in turns, in one device call: a kernel change
# measured against its baseline within one run's drift). The last pack's libraries serve when they were
# built from <rev> (.prebuilt/ops.rev); otherwise <rev> is generated and built in a git worktree with its own
# tilegen (minutes).
# VARIANTS="<name>=<rev> ...": more revisions the same way, into .prebuilt/ab_<name>.tar.xz: `ab` runs them
# between the base and this tree (a change's parts told apart in one call).
# AB_SPECS="specs/a.yaml ...": the specs a worktree build generates (default: every spec; the A/B script
# needs only its own ops, and a full build takes minutes per revision).
tmp=$(mktemp -d)
trap 'for w in "$tmp"/wt_*; do [ -d "$w" ] && git worktree remove --force "$w" 2>/dev/null; done; rm -rf "$tmp"' EXIT
pack_rev() {  # $1 revision, $2 the tarball: that revision's Python package and libraries
  local rev pkg wt
  rev=$(git rev-parse "$1^{commit}") pkg="$tmp/pkg_$rev" wt="$tmp/wt_$rev"
  mkdir -p "$pkg"
  if [ "$(cat .prebuilt/ops.rev 2>/dev/null)" = "$rev" ]; then
    git archive "$rev" generated | tar -x -C "$pkg" && tar -xJf .prebuilt/ops.tar.xz -C "$pkg"
  else
    git worktree add -q --detach "$wt" "$rev"
    (cd "$wt" && PYTHONPATH="$wt" python3 -m tilegen.cli generate ${AB_SPECS:-specs/} -o generated -q)
    (cd "$wt" && tar -c --exclude='*.o' --exclude='.ninja*' --exclude=build.ninja generated) | tar -x -C "$pkg"
  fi
  tar -cJf "$2" -C "$pkg" generated
  echo "packed $(git rev-parse --short "$rev") into $2: $(du -h "$2" | cut -f1)"
}
[ -n "${BASE:-}" ] && pack_rev "$BASE" .prebuilt/base.tar.xz
rm -f .prebuilt/ab_*.tar.xz
for v in ${VARIANTS:-}; do
  case "$v" in
    base=*|tree=*) echo "VARIANTS: base and tree name the two ends already"; exit 1 ;;
    *=*) [[ "${v%%=*}" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "VARIANTS: name ${v%%=*} (letters, digits, _ and -)"; exit 1; }
         pack_rev "${v#*=}" ".prebuilt/ab_${v%%=*}.tar.xz" ;;
    *) echo "VARIANTS: <name>=<rev>, got $v"; exit 1 ;;
  esac
done
tilegen generate specs/ -o generated -q
tar -cJf .prebuilt/ops.tar.xz generated/*/_build/*.so generated/*/_build/build.json
# the revision packed (dirty: the working tree differs from it), for a later BASE= / VARIANTS= (pack_rev)
rev=$(git rev-parse HEAD); git diff --quiet HEAD -- tilegen specs generated || rev="$rev-dirty"
echo "$rev" > .prebuilt/ops.rev
echo "packed $(tar -tJf .prebuilt/ops.tar.xz | grep -c '\.so$') libraries: $(du -h .prebuilt/ops.tar.xz | cut -f1)," \
     "TVM-FFI $(python3 -c 'import tvm_ffi; print(tvm_ffi.__version__)')"
# the lab's sweep packages (python3 -m bench sweep --sweep NAME --build-only), when built: the sweep phase
# unpacks .prebuilt/sweep_NAME.tar.xz and finds its builds current (sources and manifests travel, objects do not)
for pkg in sweep_*/; do
  [ -d "$pkg" ] && ls "$pkg"*/_build/*.so >/dev/null 2>&1 || continue
  tar -cJf ".prebuilt/${pkg%/}.tar.xz" --exclude='*.o' "${pkg%/}"
  echo "packed ${pkg%/}: $(du -h ".prebuilt/${pkg%/}.tar.xz" | cut -f1)"
done
# tilegen tune's candidate ops (tilegen tune --build-only ...), when built: the lab's tune phase unpacks them
if ls -d .tilegen-tune/pkg_* >/dev/null 2>&1; then
  tar -cJf .prebuilt/tune.tar.xz --exclude='*.o' --exclude='.ninja*' --exclude='build.ninja' .tilegen-tune
  echo "packed tune candidates: $(du -h .prebuilt/tune.tar.xz | cut -f1)"
fi
