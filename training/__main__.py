"""``python -m training STAGE --config X.yaml [--set k=v]``.

STAGE is one of corpus, cpt, finetune, evaluate, publish, pipeline (the ``flat`` dual encoder),
or ``hier``: the hierarchical model's whole recipe (``training/hier_pipeline.py``; its config is a
``training.hier.HierTrainConfig``, e.g. ``configs/hier-cpu.yaml``).

Stages read and write under ``output_dir`` from the config, so they can be run one by one:
``corpus`` -> ``cpt`` -> ``finetune`` -> ``evaluate`` -> ``publish``; ``pipeline`` runs them all
(``training/pipeline.py``). The benchmark rows (config changes of the same pipeline) are run by
``bench/quality.py`` (``bench/flat_systems.py``, ``bench/hier_systems.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.config import TrainConfig, load_config
from training.data import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "stage",
        choices=["corpus", "cpt", "finetune", "evaluate", "publish", "pipeline", "hier"],
    )
    p.add_argument("--config", type=Path, required=True, help="YAML config (see configs/).")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set cpt.steps=20 (repeatable).",
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="Skip invalid input rows (they are counted and reported).",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="evaluate/publish: the model folder (default: output_dir/finetune/model).",
    )
    p.add_argument("--no-publish", action="store_true", help="hier: train and evaluate only.")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.stage == "hier":
        from training.hier_pipeline import main_hier

        try:
            return main_hier(args.config, args.overrides, publish=not args.no_publish)
        except (DataError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    overrides = list(args.overrides) + (["data.skip_bad_rows=true"] if args.skip_bad_rows else [])
    cfg: TrainConfig = load_config(args.config, overrides)
    from training import pipeline as pl

    logging.getLogger("training").info("config: %s", json.dumps(cfg.dump()))
    pl.setup(cfg)
    try:
        if args.stage == "pipeline":
            pl.run_pipeline(cfg)
            return 0
        data = pl.load_data(cfg.data)
        if args.stage == "corpus":
            pl.stage_corpus(cfg, data)
        elif args.stage == "cpt":
            if not cfg.cpt.enabled:
                print("cpt.enabled is false: nothing to do")
                return 0
            model_dir, summary = pl.stage_cpt(cfg, data)
            print(f"cpt model: {model_dir}\n{json.dumps(summary, indent=2)}")
        elif args.stage == "finetune":
            start = pl.cpt_dir(cfg) / "model" if cfg.cpt.enabled else pl.base_model(cfg).path
            if not (start / "config.json").is_file():
                raise FileNotFoundError(
                    f"{start} not found: run the cpt stage first (or --set cpt.enabled=false)"
                )
            model_dir, summary = pl.stage_finetune(cfg, data, start)
            print(f"fine-tuned model: {model_dir}\n{json.dumps(summary, indent=2)}")
        else:
            model_dir = args.model_dir or cfg.output_dir / "finetune" / "model"
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(
                    f"{model_dir} not found: run finetune first or pass --model-dir"
                )
            metrics, _ = pl.stage_evaluate(cfg, data, model_dir)
            if args.stage == "publish":
                art = pl.stage_publish(cfg, data, model_dir, metrics, pl.saved_stages(cfg))
                print(f"published {art.version} to {cfg.publish.resolved_store()}")
            else:
                print(pl.metrics_table(metrics))
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
