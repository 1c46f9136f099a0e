#!/usr/bin/env bash
# Builds .gpu/site: TVM's runtime without its compiler, for a GPU machine that has no TVM and
# no network (the apache-tvm wheel, about 100 MB, is over what travels to it). Run from the repo
# root in the project venv (apache-tvm installed); the GPU machine's Python is 3.12, so tvm_ffi
# comes from its cp312 wheel. Then `bash benchmarks/gpu_check.sh` there (carry: .gpu).
set -euo pipefail
site=.gpu/site
rm -rf "$site" && mkdir -p "$site"
src=$(python -c "import tvm, os; print(os.path.dirname(tvm.__file__))")
cp -r "$src" "$site/tvm"
rm -rf "$site/tvm/lib/libtvm_compiler.so" "$site/tvm/3rdparty" "$site/tvm/src"   # runtime only
find "$site" -name __pycache__ -prune -exec rm -rf {} +
ffi=$(python -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
tmp=$(mktemp -d)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$tmp" "apache-tvm-ffi==$ffi"
python -m zipfile -e "$tmp"/apache_tvm_ffi-*.whl "$site"
mkdir -p "$site/bitsmith-0.1.0.dist-info"   # the backend entry points, resolved from the source tree
printf 'Metadata-Version: 2.1\nName: bitsmith\nVersion: 0.1.0\n' > "$site/bitsmith-0.1.0.dist-info/METADATA"
python - "$site/bitsmith-0.1.0.dist-info/entry_points.txt" <<'PY'
import sys, tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["bitsmith.backends"]
open(sys.argv[1], "w").write("[bitsmith.backends]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(eps.items())))
PY
du -sh "$site"
