#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: fill the git-ignored folder .whl/ with the wheels that the
# GPU machine's image lacks (it has torch, triton, transformers, ... but no deepspeed, pydantic, datasets or
# liger-kernel, and it cannot fetch anything). scripts/gpu_check.sh installs them there; the device command
# carries .whl.
#
# Usage: bash scripts/gpu_wheels.sh            (idempotent: rebuilds .whl/ from scratch every time)
# Versions: those installed in .venv where there is one (so the GPU runs what the tests here run), else the
# defaults below. Targets the image's CPython 3.12 on x86-64 Linux (manylinux).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
VENV_PY=.venv/bin/python
PIP=(python3 -m pip)
[ -x "$VENV_PY" ] && PIP=("$VENV_PY" -m pip)
KINDS_MD=/work/.library/device/KINDS.md   # lists the image's packages; used for the dependency check if present
MAX_MIB=40

# Pure-Python (or cp312 manylinux) wheels missing from the image, with the version to use when .venv lacks it.
# typing-extensions is in the image, but pydantic>=2.12 needs a recent one: carrying the .venv's version makes the
# import independent of the image's (a newer typing_extensions is backwards compatible for torch & co).
declare -A DEFAULT_VERSION=(
  [deepspeed]=0.19.8 [hjson]=3.1.0 [pydantic]=2.14.4 [pydantic-core]=2.50.5 [annotated-types]=0.8.0
  [typing-inspection]=0.4.5 [typing-extensions]=4.16.0 [datasets]=5.2.0 [dill]=0.4.1 [multiprocess]=0.70.19
  [liger-kernel]=0.8.5
)
# liger-kernel (pure Python on torch and triton): the kernel benchmark's Liger column (kernels/bench.py).
ORDER=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill
       multiprocess liger-kernel)

version_of() {  # the .venv's version of $1, else the default
  local v=""
  if [ -x "$VENV_PY" ]; then
    v=$("$VENV_PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true)
  fi
  echo "${v:-${DEFAULT_VERSION[$1]}}"
}

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf "$WHL"
mkdir -p "$WHL"

# 1. DeepSpeed as a pure-Python wheel: no op is prebuilt (DS_BUILD_OPS=0); the trainer hands DeepSpeed torch's
#    Adam, so no JIT-compiled op is needed either. Built from the sdist (PyPI has no deepspeed wheel).
DS_VERSION=$(version_of deepspeed)
echo "gpu_wheels: building deepspeed==$DS_VERSION (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-binary deepspeed -w "$WHL" "deepspeed==$DS_VERSION"

# 2. The rest: binary wheels for CPython 3.12 / manylinux x86-64 (pure ones are py3-none-any).
SPECS=()
for name in "${ORDER[@]}"; do
  [ "$name" = deepspeed ] && continue
  SPECS+=("$name==$(version_of "$name")")
done
echo "gpu_wheels: downloading ${SPECS[*]}"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$WHL" "${SPECS[@]}"

# 3. Check: exactly one wheel per package, each for cp312/py3, and every Requires-Dist (markers evaluated for
#    CPython 3.12 on x86-64 Linux, extras skipped) is either carried or in the image's package list.
CHECK_PY="$VENV_PY"; [ -x "$CHECK_PY" ] || CHECK_PY=python3
"$CHECK_PY" - "$WHL" "$KINDS_MD" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

whl_dir, kinds_md = Path(sys.argv[1]), Path(sys.argv[2])
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
carried, problems = {}, []
for wheel in sorted(whl_dir.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(wheel.name)
    if name in carried:
        problems.append(f"two wheels of {name}: {carried[name][0]} and {version}")
    if not any(t.interpreter in ("py3", "py312", "cp312") and t.platform == "any" or
               t.interpreter == "cp312" and "manylinux" in t.platform and t.platform.endswith("x86_64")
               for t in tags):
        problems.append(f"{wheel.name}: not a CPython 3.12 x86-64 Linux wheel")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    carried[name] = (version, requires)
image = set()
if kinds_md.is_file():
    text = kinds_md.read_text()
    match = re.search(r"Packages: (.*?)\.\s*$", text, re.M)
    if match:
        image = {canonicalize_name(p.strip()) for p in match.group(1).split(",")}
for name, (version, requires) in carried.items():
    for spec in requires:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another Python / platform
        dep = canonicalize_name(req.name)
        if dep in carried:
            if req.specifier and carried[dep][0] not in req.specifier:
                problems.append(f"{name} needs {spec}; carried {dep} {carried[dep][0]}")
        elif image and dep not in image:
            problems.append(f"{name} {version} needs {spec}: neither carried nor in the image")
        elif image and req.specifier:
            print(f"  note: {name} needs {spec}; the image's version is not known here (check with pip show there)")
if not image:
    print(f"  note: {kinds_md} not found: Requires-Dist not checked against the image's packages")
for name, (version, _) in sorted(carried.items()):
    print(f"  {name} {version}")
for p in problems:
    print(f"gpu_wheels: PROBLEM: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

SIZE_KIB=$(du -sk "$WHL" | cut -f1)
echo "gpu_wheels: $(find "$WHL" -type f -name '*.whl' | wc -l) wheels, $((SIZE_KIB / 1024)) MiB ($SIZE_KIB KiB) in $WHL/"
if [ "$SIZE_KIB" -gt $((MAX_MIB * 1024)) ]; then
  echo "gpu_wheels: $WHL/ is over $MAX_MIB MiB: the working tree that travels is limited to 64 MiB" >&2
  exit 1
fi
echo "gpu_wheels: device command: bash scripts/gpu_check.sh   (with carry: [\".whl\"])"
