"""``python -m vitos_verl.eval``: evaluate a checkpoint, then write the report (hydra config
``vitos_verl/eval/conf/eval.yaml``; recipes ``recipes/eval_*.yaml``).

    python -m vitos_verl.eval --config-path $PWD/recipes --config-name eval_cpu \
        model.path=outputs/models/tiny-qwen2.5-vl-sft
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from vitos_verl.platform.precision import register_resolver

register_resolver()  # ${vitos_cpu_dtype:} in the CPU recipe


@hydra.main(config_path="conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from vitos_verl.eval.report import write_report
    from vitos_verl.eval.runner import EvalError, Evaluator

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ev = Evaluator(cfg)
        counts = ev.run()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"evaluated (new questions per benchmark and method): {counts}")
    ref = cfg.report.reference
    out = write_report(cfg.out_dir, None, reference=ref, cards=int(cfg.report.cards))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
