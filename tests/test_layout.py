"""The layout header the kernels and host code use (include/tilegen/layout.cuh) against tilegen.layout,
which the planner and the checker use: compiled as host C++ and compared on many sizes."""
import random
import shutil
import subprocess

import pytest

from tilegen.core.render import INCLUDE_DIR
from tilegen.collective.layout import layout, tile_bytes_for, unit_length
from tilegen.collective.ops import OPS

PROGRAM = r"""
#include <cstdio>
#include "tilegen/collective/layout.cuh"
using namespace tilegen::layout;
int main() {
  int chunks, world, parts, elem, ctas, units;
  long long in_bytes, tile_bytes;
  while (scanf("%d %lld %d %d %d %lld %d %d", &chunks, &in_bytes, &world, &parts, &elem, &tile_bytes, &ctas,
               &units) == 8) {
    int64_t shard, part;
    shard_and_part(static_cast<Chunks>(chunks), in_bytes, world, parts, elem, &shard, &part);
    printf("%lld %lld %lld", (long long)shard, (long long)part, (long long)tile_size(part, tile_bytes, ctas));
    for (int u = 0; u < units; ++u)
      printf(" %lld:%lld", (long long)slot_offset(shard, part, parts, u),
             (long long)unit_length(static_cast<Chunks>(chunks), in_bytes, shard, part, parts, u));
    printf("\n");
  }
  Signals s{8, 16, 7, 8, 265};
  printf("%lld %lld %lld %lld\n", (long long)s.flag(kOut, 3, 5), (long long)s.flag(kScr, 2, 9),
         (long long)s.flag(kIn, 4, 0), (long long)s.words());
}
"""
CHUNK_CODE = {"one": 0, "per_rank": 1, "split": 2}


@pytest.fixture(scope="module")
def layout_exe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("layout")
    (d / "main.cc").write_text(PROGRAM)
    r = subprocess.run([cxx, "-std=c++17", f"-I{INCLUDE_DIR}", str(d / "main.cc"), "-o", str(d / "main")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / "main"


def cases(seed: int = 7, n: int = 400):
    """(op, in_bytes, world, parts, elem, tile_bytes, ctas): every collective kind, sizes from one
    element to hundreds of MiB, odd ones included (seeded)."""
    rng = random.Random(seed)
    ops = [k for k, d in OPS.items() if d.gemm is None]
    for _ in range(n):
        op, world, elem = rng.choice(ops), rng.choice([2, 3, 4, 8]), rng.choice([1, 2, 4])
        rows = OPS[op].in_rows(world)
        in_bytes = rows * elem * rng.choice([1, 3, 7, 8, 1000, 4097, rng.randrange(1, 1 << 24)])
        yield op, in_bytes, world, rng.choice([1, 2]), elem, rng.choice([1024, 16384, 262144, 1 << 20]), \
            rng.choice([1, 8, 33, 264, 528])


def test_layout_header_matches_python(layout_exe):
    rows = list(cases())
    stdin = ""
    for op, n, w, parts, elem, tile, ctas in rows:
        stdin += f"{CHUNK_CODE[OPS[op].chunks]} {n} {w} {parts} {elem} {tile} {ctas} {OPS[op].in_chunks(w) * parts}\n"
    out = subprocess.run([str(layout_exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    for (op, n, w, parts, elem, tile, ctas), line in zip(rows, out):
        shard, part = layout(op, w, n, elem, parts)
        want = [str(shard), str(part), str(tile_bytes_for(part, tile, ctas))]
        for u in range(OPS[op].in_chunks(w) * parts):
            c, h = divmod(u, parts)
            want.append(f"{c * shard + h * part}:{unit_length(op, w, n, shard, part, parts, u)}")
        assert line.split() == want, (op, n, w, parts, elem, tile, ctas)
    # signal words: entry[8], then 16 out slots and 7 scratch slots of 265 tiles, then 8 input flags
    assert out[-1].split() == [str(8 + 3 * 265 + 5), str(8 + (16 + 2) * 265 + 9), str(8 + 23 * 265 + 4),
                               str(8 + 23 * 265 + 8)]
