"""Apply one-line bugs (mutants) to a copy of the library and check that the tests catch each.

Not collected by pytest (the file name does not match ``test_*.py``); run it from the
repository root with the environment the tests use::

    python tests/mutation/run_mutants.py            # every mutant
    python tests/mutation/run_mutants.py ema sigma  # the mutants whose name contains a word
    python tests/mutation/run_mutants.py --list

For each mutant the repository's files (``git ls-files``: tracked and untracked, not ignored)
are copied to a temporary directory, the one line is replaced there, and the mutant's killing
tests run in that copy with pytest. The same tests must pass on the unmutated copy first, so
a "killed" mutant was killed by the bug and not by a test that fails anyway. The exit status is
non-zero when a mutant survives or a baseline fails.

Each mutant is a bug that once survived the whole fast suite: a hyperparameter that the tests
only used at a fixed point of the mistake (sigma = 1, decay = 0.5, rho = eta), a code path
no test executed, or an integration whose tests only checked that the loss stayed finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    """pytest node ids (or ``file::name`` prefixes, with ``-k`` expressions after ``@``)."""

    def stale(self, root: Path) -> str | None:
        """Why the mutant no longer applies to the code under ``root`` (None when it does)."""
        count = (root / self.path).read_text().count(self.original)
        if count == 1:
            return None
        return (
            f"mutant {self.name}: expected the line {self.original!r} once in {self.path}, "
            f"found it {count} times; update the mutant to the current code"
        )

    def apply(self, root: Path) -> None:
        problem = self.stale(root)
        if problem is not None:
            raise SystemExit(problem)
        file = root / self.path
        file.write_text(file.read_text().replace(self.original, self.mutated))


TRAM = "tests/test_tram.py"
MUTANTS = [
    Mutant(
        "ema-one-minus-decay",
        "tram/targets.py",
        "self.reference.update_ema(self.decay)",
        "self.reference.update_ema(1.0 - self.decay)",
        (f"{TRAM}::test_equals_algorithm_1@ema",),
    ),
    Mutant(
        "tram-sigma-squared",
        "tram/targets.py",
        'self.sigma = check_non_negative("sigma", sigma)',
        'self.sigma = check_non_negative("sigma", sigma) ** 2',
        (
            f"{TRAM}::test_equals_algorithm_1@noise or fisher",
            "tests/test_tram_distributed.py",
        ),
    ),
    Mutant(
        "noise-gaussian-sigma-squared",
        "tram/noise.py",
        "z = z.mul_(sigma)",
        "z = z.mul_(sigma * sigma)",
        (f"{TRAM}::test_equals_algorithm_1@noise",),
    ),
    Mutant(
        "noise-uniform-sigma-squared",
        "tram/noise.py",
        "z = z.mul_(2.0).sub_(1.0).mul_(sigma)",
        "z = z.mul_(2.0).sub_(1.0).mul_(sigma * sigma)",
        (f"{TRAM}::test_uniform_noise_equals_algorithm_1",),
    ),
    Mutant(
        "fisher-eta-from-rho",
        "tram/_tram_fisher.py",
        "return cls(base_optimizer, model, rho=rho, eta=fisher_eta, **kwargs)",
        "return cls(base_optimizer, model, rho=rho, eta=rho, **kwargs)",
        (f"{TRAM}::test_equals_algorithm_1@fisher",),
    ),
    Mutant(
        "divergence-argument-ignored",
        "tram/_recording.py",
        "self.divergence = get_divergence(divergence)",
        'self.divergence = get_divergence("forward_kl")',
        (f"{TRAM}::test_divergence_argument_equals_algorithm_1",),
    ),
    Mutant(
        "divergence-name-ignored",
        "tram/_recording.py",
        "self.divergence_name = divergence",
        'self.divergence_name = "forward_kl"',
        (f"{TRAM}::test_divergence_argument_equals_algorithm_1",),
    ),
    Mutant(
        "uniform-noise-ignored",
        "tram/targets.py",
        "self.noise: NoiseDistribution = noise",
        'self.noise: NoiseDistribution = "gaussian"',
        (f"{TRAM}::test_uniform_noise_equals_algorithm_1",),
    ),
    Mutant(
        "hf-loss-scale-not-passed",
        "tram/integrations/hf.py",
        "perturbed = optimizer.first_step(grad_scale=grad_scale_of(self.accelerator))",
        "perturbed = optimizer.first_step()",
        ("tests/test_hf_trainer.py::test_fp16_grad_scaler_equals_the_unscaled_run",),
    ),
    Mutant(
        "accelerate-loss-scale-not-passed",
        "tram/integrations/accelerate.py",
        "self.last_perturbed = optimizer.first_step(grad_scale=grad_scale_of(self.accelerator))",
        "self.last_perturbed = optimizer.first_step()",
        ("tests/test_accelerate.py::test_fp16_grad_scaler_equals_the_unscaled_run",),
    ),
    Mutant(
        "ascent-is-zero",
        "tram/_wrapper.py",
        "coefficient=direction * radii[bucket.group_index] / (norm + NORM_EPSILON),",
        "coefficient=0.0 * radii[bucket.group_index] / (norm + NORM_EPSILON),",
        (
            "tests/test_factory.py::test_registered_methods_take_the_reference_step",
            "tests/test_hf_trainer.py::test_mixed_precision_equals_the_hand_written_loop@sam",
            "tests/test_hf_trainer.py::test_fp16_grad_scaler_equals_the_unscaled_run",
            "tests/test_accelerate.py::test_fp16_grad_scaler_equals_the_unscaled_run",
        ),
    ),
    Mutant(
        "runner-drops-regularizers",
        "tram/experiments/run.py",
        "regularizers=build.build_regularizers(parts, model),",
        "regularizers=[],",
        ("tests/test_experiments.py::test_tiny_sentiment",),
    ),
    Mutant(
        "runner-classification-loss-taken-for-a-sum",
        "tram/experiments/models.py",
        "        _mean_loss_only(model)",
        "        pass",
        ("tests/test_experiments.py::test_gradient_accumulation_is_the_big_batch",),
    ),
    Mutant(
        "runner-evaluation-loss-of-padded-batches",
        "tram/experiments/run.py",
        '    metrics[f"{name}_loss"] = _exact_loss(output.predictions, task_type=task.type)',
        "    pass",
        ("tests/test_experiments.py::test_torchrun_two_ranks_are_one_process_on_the_global_batch",),
    ),
    Mutant(
        "runner-train-loss-of-rank-0-after-the-last-log",
        "tram/experiments/run.py",
        "                control.should_log = True",
        "                pass",
        ("tests/test_experiments.py::test_torchrun_two_ranks_are_one_process_on_the_global_batch",),
    ),
    Mutant(
        "runner-lm-evaluation-loss-unshifted",
        "tram/experiments/run.py",
        "    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]",
        "    shifted = labels",
        ("tests/test_experiments.py::test_evaluation_loss_is_the_mean_over_the_examples",),
    ),
    Mutant(
        "runner-every-rank-writes-results",
        "tram/experiments/run.py",
        "    if trainer.is_world_process_zero():",
        "    if True:",
        ("tests/test_experiments.py::test_torchrun_two_ranks_are_one_process_on_the_global_batch",),
    ),
    Mutant(
        "runner-drops-method-arguments",
        "tram/experiments/run.py",
        "method_kwargs=None if parts.method is None else parts.method.keywords,",
        "method_kwargs=None,",
        ("tests/test_experiments.py::test_tiny_sentiment",),
    ),
    # The guarantees of tests/test_guarantees.py: each check, removed.
    Mutant(
        "second-pass-not-checked",
        "tram/_wrapper.py",
        "            params = self._params()\n"
        "            if not gradients_are_finite(params, foreach=self._use_foreach(params)):",
        "            params = self._params()\n            if False:",
        ("tests/test_guarantees.py@second_pass or second_backward",),
    ),
    Mutant(
        "hf-carried-micro-batch-replayed-with-the-windows-normalisation",
        "tram/integrations/hf.py",
        "                    self.current_gradient_accumulation_steps = steps",
        "                    pass",
        ("tests/test_hf_trainer.py@carried_over",),
    ),
    Mutant(
        "hf-carried-micro-batch-replayed-with-the-windows-item-count",
        "tram/integrations/hf.py",
        "                        super().training_step(model, micro_batch, num_items_in_batch)",
        "                        super().training_step(model, micro_batch, normalisations[-1][0])",
        ("tests/test_hf_trainer.py@label_counts",),
    ),
    Mutant(
        "hf-carried-micro-batches-refused",
        "tram/integrations/hf.py",
        "        if len(window) >= 2 * accumulation:",
        "        if len(window) > accumulation:",
        ("tests/test_hf_trainer.py@carried_over",),
    ),
    Mutant(
        "lightning-replay-passes-batch-idx-always",
        "tram/integrations/lightning.py",
        '    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):',
        "    if True:",
        ("tests/test_lightning.py@without_batch_idx",),
    ),
    Mutant(
        "lightning-window-of-skipped-batches-ascends",
        "tram/integrations/lightning.py",
        "        if all(param.grad is None for param in wrapper._params()):",
        "        if False:",
        ("tests/test_lightning.py@return_none",),
    ),
    Mutant(
        "lightning-swa-batchnorm-epoch-steps",
        "tram/integrations/lightning.py",
        '    return bool(getattr(trainer.fit_loop, "_skip_backward", False))',
        "    return False",
        ("tests/test_lightning.py@batchnorm_epoch",),
    ),
    Mutant(
        "lightning-hook-kept-while-the-callback-is-swapped-out",
        "tram/integrations/lightning.py",
        "        if wrapper is None or closure is None or self not in trainer.callbacks:",
        "        if wrapper is None or closure is None:",
        ("tests/test_lightning.py@lr_find",),
    ),
    Mutant(
        "grad-scaler-step-after-an-early-unscale-accepted",
        "tram/_wrapper.py",
        "                self._refuse_a_grad_scaler_step(grad_scaler_stepping(sys._getframe(1)))",
        "                self._refuse_a_grad_scaler_step(None)",
        ("tests/test_amp.py@refused_at_the_scalers_step",),
    ),
    Mutant(
        "no-gradient-sampled-at-restore",
        "tram/_wrapper.py",
        "            state.restored_gradient_sample = gradient_sample(state.ascent_params)",
        "            pass",
        ("tests/test_amp.py@unscaling_before",),
    ),
    Mutant(
        "unscaled-before-the-ascent-accepted",
        "tram/_wrapper.py",
        "            self._refuse_unscaled_before_the_ascent()",
        "            pass",
        ("tests/test_amp.py@before_the_ascent",),
    ),
    Mutant(
        "unscaled-before-an-off-step-refused",
        "tram/_wrapper.py",
        "        if self.ascent_due:\n            self._refuse_unscaled_before_the_ascent()",
        "        if True:\n            self._refuse_unscaled_before_the_ascent()",
        ("tests/test_amp.py@off_step",),
    ),
    Mutant(
        "grad-scaler-not-remembered-without-an-ascent",
        "tram/_wrapper.py",
        "                self._remember_the_grad_scaler(grad_scaler_stepping(sys._getframe(1)))",
        "                pass",
        ("tests/test_amp.py@first_met_on_an_off_step",),
    ),
    Mutant(
        "scalers-stage-misread",
        "tram/_callers.py",
        '    return entry is not None and entry.get("stage") is OptState.UNSCALED',
        '    return entry is not None and entry.get("stage") is OptState.STEPPED',
        ("tests/test_amp.py@before_the_ascent", "tests/test_amp.py@private_stage"),
    ),
    Mutant(
        "fisher-ascent-without-grad-scale-accepted",
        "tram/_wrapper.py",
        "        elif state.first_step_unscaled_fisher:",
        "        elif False:",
        ("tests/test_amp.py@without_grad_scale",),
    ),
    Mutant(
        "closure-backpropagating-an-outer-loss-accepted",
        "tram/_wrapper.py",
        "                if _same_graph(second, loss):",
        "                if False:",
        ("tests/test_guarantees.py@computed_before_it",),
    ),
    Mutant(
        "fisher-operator-squared-in-float16",
        "tram/_ascent.py",
        "        elif grads[0].dtype == torch.float16:",
        "        elif False:",
        ("tests/test_methods.py@float16_gradients",),
    ),
    Mutant(
        "norm-dtype-promoted-over-complex-dtypes",
        "tram/_ascent.py",
        "(g.dtype.to_real() for g in grads)",
        "(g.dtype for g in grads)",
        ("tests/test_methods.py@complex",),
    ),
    Mutant(
        "second-pass-check-on-the-perturbed-weights-only",
        "tram/_wrapper.py",
        "            params = self._params()",
        "            params = ascent_params",
        ("tests/test_guarantees.py@only_the_second_pass_reaches",),
    ),
    Mutant(
        "zeros-of-first-step-stepped-on-a-weight-the-second-pass-missed",
        "tram/_wrapper.py",
        "                param.grad = None",
        "                pass",
        ("tests/test_guarantees.py@second_pass_does_not_reach",),
    ),
    Mutant(
        "a-zero-second-pass-gradient-read-as-no-second-pass",
        "tram/_wrapper.py",
        "        written = gradients_written_since(state.zeroed_gradients, state.ascent_params)",
        "        written = {p: g for p, g in gradients_written_since(state.zeroed_gradients, "
        "state.ascent_params).items() if p.grad.count_nonzero()}",
        ("tests/test_guarantees.py@zero_gradient_takes",),
    ),
    Mutant(
        "zero-grad-while-perturbed-read-as-a-second-pass",
        "tram/_wrapper.py",
        "            state.zeroed_gradients = gradients_at_rest(state.ascent_params)",
        "            pass",
        ("tests/test_guarantees.py@second_backward_raises",),
    ),
    Mutant(
        "reference-forward-updates-batchnorm",
        "tram/_recording.py",
        "                stack.enter_context(frozen_running_stats(self.module))",
        "                pass",
        ("tests/test_guarantees.py@batchnorm",),
    ),
    Mutant(
        "fsdp2-root-left-gathered",
        "tram/_recording.py",
        "            child.reshard()  # type: ignore[operator]",
        "            pass",
        (
            "tests/test_tram_memory.py::test_a_sharded_root_with_its_own_parameters_gathers_the_perturbed_weights",
        ),
    ),
    Mutant(
        "accelerate-fsdp2-local-ascent-allowed",
        "tram/integrations/accelerate.py",
        'if wrapper.local_ascent and getattr(accelerator, "is_fsdp2", False):',
        "if False:",
        ("tests/test_accelerate.py::test_local_ascent_under_fsdp2_is_refused",),
    ),
    Mutant(
        "trainer-fsdp-local-ascent-allowed",
        "tram/integrations/hf.py",
        'if self.tram_method_kwargs.get("local_ascent") and self.is_fsdp_enabled:',
        "if False:",
        ("tests/test_hf_trainer.py::test_local_ascent_under_fsdp2_is_refused",),
    ),
    Mutant(
        "reference-forward-outside-autocast",
        "tram/_recording.py",
        "                stack.enter_context(replay.autocast.context())",
        "                pass",
        # Inside the recorded forward the caller's autocast is on anyway; the reference forward
        # that runs in first_step (sharded models) is where the recorded state matters.
        ("tests/test_tram_memory.py@autocast and llama and noise",),
    ),
    Mutant(
        "snapshot-takes-backups-written-since-the-restore",
        "tram/_tram.py",
        "            if param._version == param_version and backup._version == backup_version",
        "            if True",
        ("tests/test_tram_snapshot.py",),
    ),
    Mutant(
        "snapshot-takes-backups-of-another-dtype",
        "tram/targets.py",
        "        and copy.dtype == reference.dtype",
        "        and True",
        ("tests/test_tram_snapshot.py",),
    ),
    Mutant(
        "reference-forward-without-the-recorded-dropout",
        "tram/_recording.py",
        "                    torch.set_rng_state(replay.cpu_rng)",
        "                    pass",
        ("tests/test_tram_memory.py@llama and plain",),
    ),
    Mutant(
        "any-child-called-module-unwrapped",
        "tram/_model_io.py",
        "    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or "
        "is_instance_of(",
        "    if hasattr(model, 'module') or is_instance_of(",  # any child called `module`
        ("tests/test_guarantees.py@module",),
    ),
    Mutant(
        "tram-fisher-unnoised-first-pass-accepted",
        "tram/_tram_fisher.py",
        "        if forwards == 0:",
        "        if False:",
        ("tests/test_contract.py@observes_first_pass",),
    ),
    Mutant(
        "trl-twin-for-tram-fisher",
        "tram/integrations/trl.py",
        "        if not (isinstance(optimizer, TRAM) and optimizer.records_first_pass):",
        "        if not optimizer.observes_first_pass:",  # the twin takes TRAM-Fisher's noise
        ("tests/test_trl.py@fisher",),
    ),
    Mutant(
        "scaled-step-first-pass-unobserved",
        "tram/amp.py",
        "    with optimizer.first_pass():",
        "    with torch.enable_grad():",  # TRAM records nothing, TRAM-Fisher noises nothing
        ("tests/test_contract.py@scaled_step",),
    ),
    Mutant(
        "zero-grad-keeps-a-dropped-first-pass",
        "tram/_wrapper.py",
        "        if state.first_pass_depth == 0:",
        "        if False:",
        ("tests/test_contract.py@dropped_by_zero_grad or observes_first_pass",),
    ),
    Mutant(
        "off-step-gradient-unchecked",
        "tram/_wrapper.py",
        "            params = [param for bucket in buckets for param in bucket.params]\n"
        "            if not gradients_are_finite(params, foreach=self._use_foreach(params)):",
        "            params = [param for bucket in buckets for param in bucket.params]\n"
        "            if False:",
        ("tests/test_contract.py@never_reaches",),
    ),
    Mutant(
        "nan-radius-reported-before-the-gradient",
        "tram/_wrapper.py",
        "        radius_is_finite = radii is not None and all(math.isfinite(radius) for radius in "
        "radii)",
        "        radius_is_finite = radii is not None and all(math.isfinite(radius) for radius in "
        "radii)\n        if not radius_is_finite:\n            return state.skip_ascent("
        "type(self).__name__, 'the ascent radius is not finite')",
        ("tests/test_contract.py@never_reaches",),
    ),
    Mutant(
        "reference-copies-only-what-was-trainable-at-construction",
        "tram/targets.py",
        "            if param.requires_grad and name not in self.tensors:",
        "            if param.requires_grad and name not in self.tensors and not self.names:",
        ("tests/test_tram.py@unfrozen",),
    ),
    Mutant(
        "step-closure-takes-gradients-from-outside",
        "tram/_wrapper.py",
        "            written = gradients_written_since(state.resting_gradients, self._params())",
        "            written = {}",
        ("tests/test_contract.py@accumulated_outside",),
    ),
    Mutant(
        "step-closure-refuses-gradients-the-model-zeroed",
        "tram/_wrapper.py",
        "            and any(grad() is param.grad for param, grad in written.items())",
        "            and True",
        ("tests/test_contract.py@gradients_that_are_zeroed",),
    ),
    Mutant(
        "restore-before-the-second-pass-unnoticed",
        "tram/_wrapper.py",
        "            state.restored_before_second_pass = True",
        "            pass",
        ("tests/test_contract.py@restoring_before",),
    ),
    Mutant(
        "regularizer-forwards-recorded-as-the-training-forward",
        "tram/regularizers.py",
        "        with auxiliary_forwards():",
        "        with torch.enable_grad():",
        ("tests/test_tram.py@not_the_training_forward",),
    ),
    Mutant(
        "tram-fisher-noises-regularizer-forwards",
        "tram/noise.py",
        "        if handle.training_forwards_only and in_auxiliary_forward():",
        "        if False:",
        ("tests/test_tram.py@not_the_training_forward and fisher",),
    ),
    Mutant(
        "padding-mask-passed-positionally-ignored",
        "tram/_recording.py",
        "            bound = signature.bind_partial(*args, **kwargs)",
        "            raise TypeError",
        ("tests/test_tram.py@positionally",),
    ),
    Mutant(
        "trl-metrics-of-the-replay-logged",
        "tram/integrations/trl.py",
        "            _set_trainer_state(self, after_first_pass)",
        "            pass",
        ("tests/test_trl.py@logs_trls or first_pass_once",),
    ),
    Mutant(
        "trl-orpo-cpo-stored-metrics-of-the-replay-logged",
        "tram/integrations/trl.py",
        '    "_stored_metrics",  # ORPO, CPO (trl.experimental): the same',
        "",
        ("tests/test_trl.py@first_pass_once and (orpo or cpo)",),
    ),
    Mutant(
        "trl-grpo-micro-batch-counter-advanced-by-the-replay",
        "tram/integrations/trl.py",
        '    "_step",  # GRPO, RLOO:',
        '    # "_step",  # GRPO, RLOO:',
        ("tests/test_trl.py@(exact_two_pass or first_pass_once) and grpo",),
    ),
    Mutant(
        "trl-grpo-entropy-coefficient-of-the-next-step-replayed",
        "tram/integrations/trl.py",
        '    "entropy_coef",  # GRPO',
        '    # "entropy_coef",  # GRPO',
        ("tests/test_trl.py@adaptive_entropy",),
    ),
    Mutant(
        "trl-replay-on-the-state-pass-one-left",
        "tram/integrations/trl.py",
        "            _set_trainer_state(self, self._tram_loss_states.pop(0))",
        "            self._tram_loss_states.pop(0)",
        ("tests/test_trl.py@adaptive_entropy",),
    ),
    Mutant(
        "trl-replay-prepares-its-inputs-again",
        "tram/integrations/trl.py",
        '        if step.phase == "replay":\n            return copy.copy(inputs)',
        "        if False:\n            return copy.copy(inputs)",
        ("tests/test_trl.py@exact_two_pass and (grpo or rloo)",),
    ),
    Mutant(
        "trl-distillation-tram-on-logits-accepted",
        "tram/integrations/trl.py",
        "        if without_logits is not None:",
        "        if False:",
        ("tests/test_trl.py@distillation_refuses",),
    ),
    Mutant(
        "divergence-of-one-class-accepted",
        "tram/divergence.py",
        "    if logits.shape[-1] < 2:",
        "    if False:",
        ("tests/test_divergence.py@single_class", "tests/test_trl.py@one_logit"),
    ),
    Mutant(
        "trl-generating-trainer-accepted",
        "tram/integrations/trl.py",
        "    if generating is not None:",
        "    if False:",
        ("tests/test_trl.py@generate_in_training_step",),
    ),
    Mutant(
        "hydra-added-key-ignored",
        "tram/experiments/run.py",
        "    _check_known_keys(cfg)",
        "    pass",
        ("tests/test_configs.py@validate_rejects",),
    ),
    Mutant(
        "accumulated-d-unweighted",
        "tram/_recording.py",
        "        totals = torch.stack([(measured[:, 0] * measured[:, 1]).sum(), "
        "measured[:, 1].sum()])",
        "        totals = torch.stack([measured[:, 0].sum(), "
        "measured[:, 1].new_tensor(len(values))])",
        ("tests/test_tram.py@whole_batch",),
    ),
    Mutant(
        "sharded-reference-accepted",
        "tram/targets.py",
        "        if parameters_are_sharded(model, self.model):",
        "        if False:",
        ("tests/test_tram_memory.py@refuse_sharded",),
    ),
    Mutant(
        "negative-radius-kept",
        "tram/_recording.py",
        "    return 0.0 if radius < 0 else radius",
        "    return radius",
        ("tests/test_tram.py@below_zero",),
    ),
    Mutant(
        "replaced-hyperparameters-unsaid",
        "tram/_wrapper.py",
        "        if replaced:",
        "        if False:",
        ("tests/test_guarantees.py@another_rho",),
    ),
    Mutant(
        "state-dict-without-tram-state-unsaid",
        "tram/_wrapper.py",
        "        if wrapper_state is None:",
        "        if False:",
        ("tests/test_guarantees.py@without_trams",),
    ),
    Mutant(
        "default-named-targets-share-checkpoints",
        "tram/_tram.py",
        '        return f"{name}:{type(self.target).__qualname__}" '
        "if name == Target.name else name",
        "        return name",
        ("tests/test_target_objects.py@default_name",),
    ),
    Mutant(
        "tuning-ties-by-float-equality",
        "tram/experiments/generalization.py",
        "    tied = [value for value, score in scores.items() if best - score <= TIE_TOLERANCE]",
        "    tied = [value for value, score in scores.items() if score == best]",
        ("tests/test_generalization.py@float_sums",),
    ),
    Mutant(
        "fsdp1-parameters-accepted",
        "tram/_validation.py",
        '    if any(getattr(param, "_fsdp_flattened", False) for param in params):',
        "    if False:",
        ("tests/test_contract.py@fsdp1",),
    ),
    Mutant(
        "fsdp1-flagged-after-construction-not-checked",
        "tram/_buckets.py",
        "        refuse_fsdp1_parameters(method, [param])\n",
        "",
        ("tests/test_contract.py@fsdp1_wrapping_after",),
    ),
    Mutant(
        "dcp-state-initialising-step-counted",
        "tram/_wrapper.py",
        "            if not state.ascent_attempted and self._initialises_the_base_state():",
        "            if False:",
        ("tests/test_guarantees.py@without_trams",),
    ),
    Mutant(
        "wrapper-state-beside-param-groups",
        "tram/_wrapper.py",
        '        state_dict["param_groups"][0][WRAPPER_STATE_KEY] = entry',
        "        state_dict[WRAPPER_STATE_KEY] = entry",
        (
            "tests/test_guarantees.py@resume_exactly",
            "tests/test_distributed.py@checkpoint_resume",
        ),
    ),
    Mutant(
        "wrapper-state-left-in-the-loaded-group",
        "tram/_wrapper.py",
        "                found.append(group.pop(WRAPPER_STATE_KEY))",
        "                found.append(group[WRAPPER_STATE_KEY])",
        ("tests/test_guarantees.py@resume_exactly or earlier_versions",),
    ),
    Mutant(
        "reference-advances-on-every-after-step",
        "tram/regularizers.py",
        "        if self._steps.observed and not self._steps.stepped:",
        "        if False:",
        ("tests/test_regularizers.py@advances_once or without_a_step",),
    ),
    Mutant(
        "forgotten-after-step-not-refused",
        "tram/regularizers.py",
        "        if self._steps.stepped:",
        "        if False:",
        ("tests/test_regularizers.py@forgotten or copied",),
    ),
    Mutant(
        "state-initialising-step-is-a-step",
        "tram/_step_state.py",
        '    if any(float(group.get("lr", 1.0)) != 0.0 for group in param_groups):',
        "    if True:",
        ("tests/test_regularizers.py@not_this", "tests/test_guarantees.py@without_trams"),
    ),
    Mutant(
        "wrapper-step-is-a-step",
        "tram/_step_watch.py",
        "        if isinstance(inner, Optimizer):",
        "        if False:",
        ("tests/test_regularizers.py@not_this",),
    ),
    Mutant(
        "noise-block-without-a-forward-passes",
        "tram/noise.py",
        "    if handle.calls == 0 and not handle.training_forwards_only:",
        "    if False:",
        ("tests/test_noise.py@hooked_forward",),
    ),
    Mutant(
        "r3f-noised-forward-through-the-compiled-graph",
        "tram/regularizers.py",
        "            noised = extract_logits(call_model(eager, inputs))",
        "            noised = extract_logits(call_model(model, inputs))",
        ("tests/test_regularizers.py@compiled",),
    ),
    Mutant(
        "r3f-in-place-compiled-forward-kept",
        "tram/noise.py",
        "            if compiled_call is not None:",
        "            if False:",
        ("tests/test_regularizers.py@compiled_in_place",),
    ),
    Mutant(
        "batchnorm-without-trained-weights-passes",
        "tram/batchnorm.py",
        "        if variable is not None and id(variable) in perturbed:",
        "        if False:",
        ("tests/test_batchnorm.py@without_trained_weights",),
    ),
    Mutant(
        "batchnorm-outside-model-not-guarded",
        "tram/_wrapper.py",
        "        if self.model is None or self._perturbs_outside_the_model(state.ascent_params):",
        "        if self.model is None:",
        ("tests/test_batchnorm.py@outside_the_model_given",),
    ),
    Mutant(
        "batchnorm-outside-a-whole-model-not-guarded-in-the-replay",
        "tram/_wrapper.py",
        "        if not state.second_pass_entered and state.batchnorm_guard is None:",
        "        if False:",
        ("tests/test_batchnorm.py@holds_every_perturbed_weight",),
    ),
    Mutant(
        "batchnorm-outside-a-whole-model-judged-as-a-compiled-graphs",
        "tram/_wrapper.py",
        "        state.watched_outside_the_model = True",
        "        pass",
        ("tests/test_batchnorm.py@holds_every_perturbed_weight",),
    ),
    Mutant(
        "every-batchnorm-never-walked-for",
        "tram/batchnorm.py",
        "register_module_buffer_registration_hook(self._heard_a_buffer)\n            self._walk()",
        "register_module_buffer_registration_hook(self._heard_a_buffer)\n            pass",
        ("tests/test_batchnorm.py@holds_every_perturbed_weight or searched_again_only_after",),
    ),
    Mutant(
        "every-batchnorm-walked-at-every-second-pass",
        "tram/batchnorm.py",
        "        if self._construction is None:\n",
        "        if True:\n",
        ("tests/test_batchnorm.py@searched_again_only_after or built_after_the_walk",),
    ),
    Mutant(
        "every-batchnorm-not-heard-of-when-built",
        "tram/batchnorm.py",
        '        if name == "running_mean" and isinstance(module, _BatchNorm):',
        "        if False:",
        ("tests/test_batchnorm.py@built_after_the_walk",),
    ),
    Mutant(
        "hf-replay-outside-the-second-pass",
        "tram/integrations/hf.py",
        "            with optimizer.second_pass():",
        "            with contextlib.nullcontext():",
        ("tests/test_hf_trainer.py@second_pass_for_batchnorm",),
    ),
    Mutant(
        "lightning-replay-outside-the-second-pass",
        "tram/integrations/lightning.py",
        "                with wrapper.second_pass():",
        "                with contextlib.nullcontext():",
        ("tests/test_lightning.py@second_pass_for_batchnorm and TramCallback",),
    ),
    Mutant(
        "manual-step-replay-outside-the-second-pass",
        "tram/integrations/lightning.py",
        "            with wrapper.second_pass(), _muted_logging(pl_module), ",
        "            with contextlib.nullcontext(), _muted_logging(pl_module), ",
        ("tests/test_lightning.py@second_pass_for_batchnorm and manual_step",),
    ),
    Mutant(
        "accelerate-replay-outside-the-second-pass",
        "tram/integrations/accelerate.py",
        "                    with optimizer.second_pass():",
        "                    with contextlib.nullcontext():",
        ("tests/test_accelerate.py@second_pass_for_batchnorm",),
    ),
    Mutant(
        "second-pass-that-raised-left-perturbed",
        "tram/_wrapper.py",
        "            state.abandon()\n            self.restore()\n            raise\n",
        "            raise\n",
        ("tests/test_batchnorm.py@inside_second_pass",),
    ),
    Mutant(
        "second-pass-entered-at-theta",
        "tram/_wrapper.py",
        "        if not self.is_perturbed:\n            raise RuntimeError(\n"
        '                "second_pass() entered',
        "        if False:\n            raise RuntimeError(\n"
        '                "second_pass() entered',
        ("tests/test_batchnorm.py@inside_second_pass",),
    ),
    Mutant(
        "regularizer-reference-of-replaced-parameters",
        "tram/regularizers.py",
        "        self.reference.check_live(type(self).__name__)",
        "        pass",
        ("tests/test_regularizers.py@replaced or before_peft",),
    ),
    Mutant(
        "maximize-ascends-up-the-gradient",
        "tram/_wrapper.py",
        "            direction = -1.0 if self.param_groups[bucket.group_index]"
        '.get("maximize") else 1.0',
        "            direction = 1.0",
        ("tests/test_contract.py@maximize",),
    ),
    Mutant(
        "batchnorm-updated-twice-without-model",
        "tram/batchnorm.py",
        "        if is_armed is None or not is_armed():",
        "        if True:",
        ("tests/test_batchnorm.py@second_update_is_refused",),
    ),
    Mutant(
        "compiled-batchnorm-not-judged",
        "tram/batchnorm.py",
        "        for subtree in _compiled_subtrees(module):",
        "        for subtree in []:",
        ("tests/test_batchnorm.py@compiled",),
    ),
    Mutant(
        "compiled-forward-batchnorm-unseen",
        "tram/batchnorm.py",
        "    if uncompiled_forward(module) is not None:",
        "    if False:",
        ("tests/test_batchnorm.py@compiled_graph_is_refused",),
    ),
    Mutant(
        "child-compiled-in-place-batchnorm-unseen",
        "tram/batchnorm.py",
        "if child is not None and compiled_in_place(child) is not None and child is not inner",
        "if False",
        ("tests/test_batchnorm.py@judged_by_its_parents_hook",),
    ),
    Mutant(
        "compiled-teacher-batchnorm-refused",
        "tram/batchnorm.py",
        "    return holds_perturbed and not any(param.requires_grad for param in own)",
        "    return not any(param.requires_grad for param in own)",
        ("tests/test_batchnorm.py@judged_by_its_module",),
    ),
    Mutant(
        "previous-reference-swapped-while-dynamo-holds-it",
        "tram/targets.py",
        "        and weakref.getweakrefcount(reference) == 0\n",
        "\n",
        (
            "tests/test_compile.py@TRAM-previous",
            "tests/test_guarantees.py@traced_in_its_first_pass",
            "tests/test_lightning.py@compiled_net_accumulation and tram_previous",
        ),
    ),
    Mutant(
        "lightning-replay-updates-torchmetrics",
        "tram/integrations/lightning.py",
        "with _muted_logging(pl_module), _metric_states_kept(pl_module), torch.enable_grad():",
        "with _muted_logging(pl_module), torch.enable_grad():",
        ("tests/test_lightning.py@torchmetrics",),
    ),
    Mutant(
        "manual-step-second-call-logs",
        "tram/integrations/lightning.py",
        "            with wrapper.second_pass(), _muted_logging(pl_module), "
        "_metric_states_kept(pl_module):",
        "            with wrapper.second_pass(), _metric_states_kept(pl_module):",
        ("tests/test_lightning.py@torchmetrics",),
    ),
    Mutant(
        "metric-tensor-state-not-cloned",
        "tram/integrations/lightning.py",
        "        name: value.clone() if isinstance(value, Tensor) else list(value)",
        "        name: value if isinstance(value, Tensor) else list(value)",
        ("tests/test_lightning.py@torchmetrics",),
    ),
    Mutant(
        "metric-list-state-not-copied",
        "tram/integrations/lightning.py",
        "        name: value.clone() if isinstance(value, Tensor) else list(value)",
        "        name: value.clone() if isinstance(value, Tensor) else value",
        ("tests/test_lightning.py@torchmetrics",),
    ),
    Mutant(
        "batchnorm-guard-armed-inside-the-graph",
        "tram/batchnorm.py",
        "@torch._disable_dynamo\ndef refuse_running_stats_updates(",
        "def refuse_running_stats_updates(",
        ("tests/test_batchnorm.py@outside_compiled_graphs",),
    ),
    Mutant(
        "batchnorm-guard-disarmed-inside-the-graph",
        "tram/batchnorm.py",
        "@torch._disable_dynamo\ndef disarm(",
        "def disarm(",
        ("tests/test_batchnorm.py@outside_compiled_graphs",),
    ),
    Mutant(
        "guard-kept-out-of-graphs-at-import",
        "tram/batchnorm.py",
        "@torch._disable_dynamo\ndef disarm(",
        "@torch.compiler.disable\ndef disarm(",
        ("tests/test_batchnorm.py@leaves_import_tram_light",),
    ),
    Mutant(
        "guard-reads-an-empty-child-slot",
        "tram/batchnorm.py",
        "if child is not None and compiled_in_place(child) is not None and child is not inner",
        "if compiled_in_place(child) is not None and child is not inner",
        ("tests/test_batchnorm.py@child_registered_as_none",),
    ),
    Mutant(
        "compiled-graph-statistics-not-put-back",
        "tram/batchnorm.py",
        "                buffer.copy_(value)",
        "                pass",
        ("tests/test_batchnorm.py@compiled_function_that_runs_the_model",),
    ),
    Mutant(
        "compiled-graph-own-weights-not-judged",
        "tram/batchnorm.py",
        "if record.own_weights_perturbed or replayed:",
        "if replayed:",
        ("tests/test_batchnorm.py@compiled_function_that_runs_the_model",),
    ),
    Mutant(
        "compiled-graph-replay-not-judged",
        "tram/batchnorm.py",
        "if record.own_weights_perturbed or replayed:",
        "if record.own_weights_perturbed:",
        ("tests/test_batchnorm.py@judged_by_the_form",),
    ),
    Mutant(
        "compiled-graph-teacher-judged",
        "tram/batchnorm.py",
        "if record.own_weights_perturbed or replayed:",
        "if True:",
        ("tests/test_batchnorm.py@compiled_teachers_batchnorm",),
    ),
    Mutant(
        "compiled-graph-judged-after-the-second-pass",
        "tram/_wrapper.py",
        "                state.watched_running_stats, replayed=state.second_pass_entered",
        "                state.watched_running_stats, replayed=state.in_second_pass",
        ("tests/test_batchnorm.py@judged_by_the_form",),
    ),
    Mutant(
        "compiled-graph-second-update-stepped",
        "tram/_wrapper.py",
        "        if state.running_stats_updated_twice:",
        "        if False:",
        ("tests/test_batchnorm.py@compiled_function_that_runs_the_model",),
    ),
    Mutant(
        "compiled-graph-batchnorms-not-collected",
        "tram/batchnorm.py",
        "if issubclass(kind, _BatchNorm) and candidate.running_mean is not None:",
        "if False:",
        ("tests/test_batchnorm.py@compiled_function_that_runs_the_model",),
    ),
    Mutant(
        "compiled-in-place-batchnorm-not-refused",
        "tram/_wrapper.py",
        "        if batchnorm is not None:\n            raise running_stats_refusal(",
        "        if False:\n            raise running_stats_refusal(",
        ("tests/test_batchnorm.py@compiled_in_place",),
    ),
    Mutant(
        "compiled-in-place-search-ignores-model",
        "tram/_wrapper.py",
        "batchnorms_compiled_in_place(params, excluding=self.model)",
        "batchnorms_compiled_in_place(params, excluding=None)",
        ("tests/test_batchnorm.py@beside_a_model_compiled_in_place",),
    ),
    Mutant(
        "compiled-in-place-search-asks-each-object",
        "tram/batchnorm.py",
        "if not issubclass(kind, nn.Module):",
        "if not isinstance(candidate, nn.Module):",
        ("tests/test_batchnorm.py@searched_again_only_after",),
    ),
    Mutant(
        "compiled-in-place-searched-at-every-step",
        "tram/batchnorm.py",
        "if not self._listening() or self._walked_at != self.compilations:",
        "if True:",
        ("tests/test_batchnorm.py@searched_again_only_after",),
    ),
    Mutant(
        "compiled-in-place-search-deaf-to-compilations",
        "tram/batchnorm.py",
        "        self.compilations += 1\n\n    def _listening",
        "        pass\n\n    def _listening",
        ("tests/test_batchnorm.py@found_at_the_next_step",),
    ),
    Mutant(
        "compiled-in-place-search-deaf-after-reset",
        "tram/batchnorm.py",
        "            self.compilations += 1  # what was compiled unheard",
        "            pass  # what was compiled unheard",
        ("tests/test_batchnorm.py@searched_again_only_after",),
    ),
    Mutant(
        "compiled-in-place-batchnorms-kept-for-other-params",
        "tram/_wrapper.py",
        "        key = (search_compiled_in_place(), tuple(id(param) for param in params))",
        "        key = (search_compiled_in_place(), ())",
        ("tests/test_batchnorm.py@picked_again_for_other_perturbed_weights",),
    ),
    Mutant(
        "compiled-in-place-searched-before-any-compilation",
        "tram/batchnorm.py",
        '"""The live modules compiled in place."""\n        if not _anything_compiled():',
        '"""The live modules compiled in place."""\n        if False:',
        ("tests/test_batchnorm.py@searched_again_only_after",),
    ),
    Mutant(
        "compiled-graph-batchnorms-searched-before-any-compilation",
        "tram/batchnorm.py",
        '        compiled nothing."""\n        if not _anything_compiled():',
        '        compiled nothing."""\n        if False:',
        ("tests/test_batchnorm.py@searched_again_only_after",),
    ),
    Mutant(
        "batchnorm-guard-left-armed-after-restore",
        "tram/_wrapper.py",
        "            disarm(state.batchnorm_guard)\n",
        "            pass\n",
        ("tests/test_batchnorm.py@second_update_is_refused",),
    ),
    Mutant(
        "complex-weights-take-the-signed-shortcut",
        "tram/_ascent.py",
        '    return scaling == "adaptive" and eta == 0 and not params[0].is_complex()',
        '    return scaling == "adaptive" and eta == 0',
        ("tests/test_methods.py@complex and loop",),
    ),
    Mutant(
        "complex-fisher-squares-the-gradient",
        "tram/_ascent.py",
        "        if grads[0].is_complex():",
        "        if False:",
        ("tests/test_methods.py@complex and FisherSAM",),
    ),
    Mutant(
        "tram-target-reference-of-replaced-parameters",
        "tram/targets.py",
        '        self.reference.check_live(f"TRAM\'s {type(self).__name__} target")',
        "        pass",
        ("tests/test_target_objects.py@replaced",),
    ),
    Mutant(
        "tram-fisher-first-pass-through-an-in-place-compiled-graph",
        "tram/_tram_fisher.py",
        "        with eager_forward(self.module), self.noised_inputs.noised() as handle:",
        "        with self.noised_inputs.noised() as handle:",
        ("tests/test_guarantees.py@in_place",),
    ),
    Mutant(
        "step-without-ascent-taken-as-a-plain-step",
        "tram/_wrapper.py",
        "                refuse_missing_ascent(type(self).__name__, "
        "type(self.base_optimizer).__name__)",
        "                pass",
        ("tests/test_guarantees.py@without_ascent_is_refused or scaler_step_alone",),
    ),
    Mutant(
        "batchnorm-guard-ignores-the-closures-second-call",
        "tram/batchnorm.py",
        "in_the_second_pass() or _runs_at_perturbed_weights(module, args, perturbed)",
        "_runs_at_perturbed_weights(module, args, perturbed)",
        ("tests/test_batchnorm.py@any_batchnorm",),
    ),
    Mutant(
        "second-pass-not-flagged",
        "tram/_wrapper.py",
        "        outer, state.in_second_pass = state.in_second_pass, True",
        "        outer = state.in_second_pass",
        ("tests/test_batchnorm.py@any_batchnorm",),
    ),
    Mutant(
        "duplicate-parameters-accepted",
        "tram/_validation.py",
        "        if id(param) in seen:",
        "        if False:",
        ("tests/test_errors.py@twice",),
    ),
    Mutant(
        "checkpoint-phase-traced-by-torch-compile",
        "tram/_checkpointing.py",
        "    if torch.compiler.is_compiling():\n        return None\n",
        "",
        ("tests/test_checkpointing.py@torch_compile_traces",),
    ),
    Mutant(
        "r3f-noised-forward-updates-batchnorm",
        "tram/regularizers.py",
        "            frozen_running_stats(model),\n",
        "",
        ("tests/test_batchnorm.py@r3f",),
    ),
    Mutant(
        "noise-in-a-checkpointed-block-not-refused",
        "tram/noise.py",
        "            _refuse_checkpointed(module)\n",
        "            pass\n",
        (
            "tests/test_checkpointing.py@raises",
            "tests/test_hf_trainer.py@refuses_r3f_noise_inside",
        ),
    ),
    Mutant(
        "noise-refused-in-a-reference-forward-without-gradients",
        "tram/noise.py",
        "    handle.builds_graph = torch.is_grad_enabled()",
        "    handle.builds_graph = True",
        ("tests/test_checkpointing.py@inside or without_gradients",),
    ),
    Mutant(
        "tram-records-the-checkpoint-recomputation",
        "tram/_recording.py",
        "                and not _recomputed_after_recording()\n",
        "",
        ("tests/test_checkpointing.py@whole_model",),
    ),
    # Resumes through each client's checkpoint: TRAM's reference (EMA, θ0) or noise generator,
    # TRAM-Fisher's noise generator and the step counter must come from the loaded state.
    Mutant(
        "tram-target-state-not-loaded",
        "tram/_tram.py",
        "        if own:",
        "        if False:",
        (
            "tests/test_fabric.py@resume and TRAM",
            "tests/test_lightning.py::test_manual_step_resume_is_bit_exact",
            "tests/test_trl.py@resume_bit_exactly and dpo",
        ),
    ),
    Mutant(
        "tram-fisher-generator-not-loaded",
        "tram/_tram_fisher.py",
        '        if "noise_draws" in state or "generator" in state:',
        "        if False:",
        ("tests/test_trl.py@resume_bit_exactly and rloo",),
    ),
    # The noise stream (tram/_noise_stream.py): each rank its own draw, the count its state.
    Mutant(
        "noise-stream-same-draws-on-every-rank",
        "tram/_noise_stream.py",
        "        seed = draw_seed(self.seed, rank=data_parallel_rank(), draw=self.draws)",
        "        seed = draw_seed(self.seed, rank=0, draw=self.draws)",
        (
            "tests/test_tram_distributed.py@accumulating_closure and DDP",
            "tests/test_tram_distributed.py@fisher",
            "tests/test_noise_stream.py@rank",
        ),
    ),
    Mutant(
        "noise-stream-count-not-loaded",
        "tram/_noise_stream.py",
        "        self.draws = draws\n",
        "        pass\n",
        (
            "tests/test_noise_stream.py@resume",
            "tests/test_distributed.py@ddp_checkpoint_resume and tram_x",
        ),
    ),
    Mutant(
        "noise-stream-draw-not-counted",
        "tram/_noise_stream.py",
        "        self.draws += 1",
        "        pass",
        (
            "tests/test_tram.py@radius_is_the_mean_over_micro_batches",
            "tests/test_regularizers.py@plain_module",
        ),
    ),
    Mutant(
        "noise-stream-traced-by-dynamo",
        "tram/_noise_stream.py",
        "    @torch._disable_dynamo\n",
        "",
        ("tests/test_compile.py@accumulation_on_a_compiled_model_is_the_eager_run and noise",),
    ),
    Mutant(
        "noise-seed-default-fixed",
        "tram/_noise_stream.py",
        "        self.seed = torch.initial_seed() if seed is None else seed",
        "        self.seed = 0 if seed is None else seed",
        (
            "tests/test_noise_stream.py@default_seed",
            "tests/test_hf_trainer.py@unseeded_takes_the_trainers_seed",
        ),
    ),
    Mutant(
        "noise-seed-default-drawn-from-the-global-generator",
        "tram/_noise_stream.py",
        "        self.seed = torch.initial_seed() if seed is None else seed",
        "        self.seed = torch.seed() if seed is None else seed",
        ("tests/test_noise_stream.py@follows_torch_manual_seed",),
    ),
    Mutant(
        "noise-seed-not-loaded",
        "tram/_noise_stream.py",
        "        self.seed = seed\n        self.seed_given = True",
        "        self.seed_given = True",
        (
            "tests/test_noise_stream.py@continues_the_checkpoints_seed",
            "tests/test_distributed.py@ddp_checkpoint_resume and tram_x",
        ),
    ),
    Mutant(
        "checkpointed-count-left-a-tensor",
        "tram/_noise_stream.py",
        "        return value.item()",
        "        return value",
        ("tests/test_noise_stream.py@given_as_a_tensor or invalid_checkpointed_seed",),
    ),
    Mutant(
        "checkpointed-tensor-of-several-numbers-read-with-item",
        "tram/_noise_stream.py",
        "    if isinstance(value, torch.Tensor) and value.numel() == 1:",
        "    if isinstance(value, torch.Tensor):",
        ("tests/test_noise_stream.py@invalid_count or invalid_checkpointed_seed",),
    ),
    Mutant(
        "runner-job-not-seeded",
        "tram/experiments/run.py",
        "    set_seed(int(cfg.seed))\n",
        "",
        ("tests/test_experiments.py@later_job_is_the_job_run_alone",),
    ),
    Mutant(
        "schedule-free-closure-optimizer-with-a-defaulted-closure-accepted",
        "tram/_validation.py",
        'and cls.__name__.endswith("Closure"):',
        'and cls.__name__.endswith("Closure") and False:',
        ("tests/test_errors.py@whose-step-declares-a-default",),
    ),
    Mutant(
        "another-librarys-two-pass-optimizer-accepted-as-the-base",
        "tram/_validation.py",
        "    if own_passes:",
        "    if False and own_passes:",
        ("tests/test_errors.py@another-librarys or sam-written-by-hand",),
    ),
    Mutant(
        "gsam-accepted-as-the-base",
        "tram/_validation.py",
        '("perturb_weights", "un_perturb"))',
        '("first_step", "second_step"))',
        ("tests/test_errors.py@another-librarys-gsam",),
    ),
    Mutant(
        "zero-redundancy-optimizer-overlapping-ddp-accepted",
        "tram/_zero_redundancy.py",
        'and getattr(optimizer, "_overlap_with_ddp", False):',
        "and False:",
        ("tests/test_contract.py@steps_inside_the_backward",),
    ),
    Mutant(
        "zero-redundancy-local-optimizer-kept-after-a-refused-load",
        "tram/_wrapper.py",
        "            previous_local.restore()\n",
        "",
        ("tests/test_guarantees.py@refused_state_dict",),
    ),
    Mutant(
        "zero-redundancy-unconsolidated-state-error-without-the-fix",
        "tram/_wrapper.py",
        "                raise unconsolidated_state_error(type(self).__name__, error) from error\n",
        "",
        ("tests/test_contract.py@resumes_as_the_optimizer_it_shards",),
    ),
    Mutant(
        "zero-redundancy-load-changes-the-callers-checkpoint",
        "tram/_wrapper.py",
        '        state_dict["state"] = dict(state_dict["state"])\n',
        "",
        ("tests/test_distributed.py@checkpoint_resume",),
    ),
    Mutant(
        "consolidate-state-dict-not-offered-by-the-wrapper",
        "tram/_wrapper.py",
        '        method = getattr(self.base_optimizer, "consolidate_state_dict", None)\n',
        "        method = None\n",
        (
            "tests/test_lightning.py@zero_redundancy",
            "tests/test_contract.py@there_exactly_when_the_base_has_it",
        ),
    ),
    Mutant(
        "incomplete-optimizer-accepted-as-the-base",
        "tram/_validation.py",
        "    missing = [name for name in _PARTS_OF_AN_OPTIMIZER if not hasattr(optimizer, name)]\n",
        "    missing = []\n",
        (
            "tests/test_errors.py@skipped-optimizer-init",
            "tests/test_contract.py@post_local_sgd",
        ),
    ),
    Mutant(
        "grad-scaler-step-with-a-closure-accepted",
        "tram/_callers.py",
        'if caller == "GradScaler" and isinstance(owner, GradScaler) and owner.is_enabled():',
        "if False:",
        (
            "tests/test_amp.py@grad_scaler_step_with_a_closure",
            "tests/test_accelerate.py@grad_scaler_is_refused",
        ),
    ),
    Mutant(
        "accelerate-step-closure-inside-accumulation-accepted",
        "tram/_callers.py",
        "            if steps > 1:\n",
        "            if False:\n",
        ("tests/test_accelerate.py@inside_accumulation_is_refused",),
    ),
    Mutant(
        "accelerates-prepared-optimizer-accepted-as-the-base",
        "tram/_validation.py",
        '    if is_instance_of(base_optimizer, "accelerate.optimizer", "AcceleratedOptimizer"):',
        "    if False:",
        ("tests/test_accelerate.py@prepared_optimizer_is_refused_as_the_base",),
    ),
    Mutant(
        "state-dict-post-hooks-on-the-wrapper-ignored",
        "tram/_wrapper.py",
        'for post_hook in _hooks(self, "_optimizer_state_dict_post_hooks"):',
        "for post_hook in []:",
        ("tests/test_contract.py@state_dict_hooks",),
    ),
    Mutant(
        "load-state-dict-pre-hooks-on-the-wrapper-ignored",
        "tram/_wrapper.py",
        'for pre_hook in _hooks(self, "_optimizer_load_state_dict_pre_hooks"):',
        "for pre_hook in []:",
        ("tests/test_contract.py@state_dict_hooks",),
    ),
    Mutant(
        "load-state-dict-pre-hooks-change-the-callers-dict",
        "tram/_wrapper.py",
        "            state_dict = state_dict.copy()\n",
        "            pass\n",
        ("tests/test_contract.py@state_dict_hooks",),
    ),
    Mutant(
        "disabled-grad-scaler-refused",
        "tram/_callers.py",
        'caller == "GradScaler" and isinstance(owner, GradScaler) and owner.is_enabled():',
        'caller == "GradScaler" and isinstance(owner, GradScaler):',
        ("tests/test_amp.py@disabled_grad_scaler",),
    ),
    Mutant(
        "accelerated-optimizer-subclass-accepted-as-the-base",
        "tram/_validation.py",
        '    if is_instance_of(base_optimizer, "accelerate.optimizer", "AcceleratedOptimizer"):',
        '    if type(base_optimizer).__name__ == "AcceleratedOptimizer":',
        ("tests/test_accelerate.py@prepared_optimizer_is_refused_as_the_base",),
    ),
    Mutant(
        "shorthand-era-state-dict-not-converted-after-the-pre-hooks",
        "tram/_wrapper.py",
        "        state_dict = self._upgrade_state_dict(state_dict)\n",
        "",
        ("tests/test_target_objects.py@shorthand_era",),
    ),
    Mutant(
        "signed-rank-p-ties-ranked-as-whole-numbers",
        "tram/experiments/report.py",
        "    doubled = [round(2 * r) for r in rankdata([abs(d) for d in nonzero])]",
        "    doubled = [2 * round(r) for r in rankdata([abs(d) for d in nonzero])]",
        ("tests/test_report.py@exact_with_ties",),
    ),
    Mutant(
        "signed-rank-p-one-tail-without-the-observed-value",
        "tram/experiments/report.py",
        "    upper = sum(counts[observed:])",
        "    upper = sum(counts[observed + 1 :])",
        ("tests/test_report.py@exact_with_ties",),
    ),
    Mutant(
        "runner-radius-rank-0s-only",
        "tram/experiments/run.py",
        "    gathered = accelerator.gather(mine.to(accelerator.device))",
        "    gathered = mine.repeat(accelerator.num_processes)",
        ("tests/test_experiments.py@gathers_every_ranks_radius",),
    ),
    Mutant(
        "runner-radius-agreeing-ranks-averaged",
        "tram/experiments/run.py",
        "    values = torch.where(lowest == highest, lowest, mean)",
        "    values = mean",
        ("tests/test_experiments.py@mean_over_ranks_exact",),
    ),
    Mutant(
        "runner-radius-step-dropped-when-one-rank-skipped-its-ascent",
        "tram/experiments/run.py",
        "    mean = per_rank.masked_fill(~finite, math.nan).nanmean(dim=0)",
        "    mean = per_rank.mean(dim=0)",
        ("tests/test_experiments.py@mean_over_ranks_exact",),
    ),
    Mutant(
        "runner-radius-of-the-last-ascent-repeated-on-a-step-without-one",
        "tram/experiments/run.py",
        "        ascended = at_begin == (True, int(optimizer.skipped_ascents))",
        "        ascended = True",
        (
            "tests/test_experiments.py@each_ascent_is_recorded",
            "tests/test_experiments.py@skipped_ascent_records_no_radius",
        ),
    ),
    Mutant(
        "local-reused-radius-of-rank-0-taken-by-every-rank",
        "tram/_tram.py",
        "            if per_rank and _world_size() > 1:",
        "            if False:",
        ("tests/test_distributed.py@resumed_local_ascent_measures",),
    ),
    Mutant(
        "local-reused-radius-not-marked-as-one-ranks",
        "tram/_tram.py",
        "        self._radius_state.last_radius_per_rank = self.local_ascent and _world_size() > 1",
        "        self._radius_state.last_radius_per_rank = False",
        ("tests/test_distributed.py@resumed_local_ascent_measures",),
    ),
    Mutant(
        "last-radius-per-rank-flag-not-checked",
        "tram/_tram.py",
        "    if not isinstance(value, bool):",
        "    if False:",
        ("tests/test_target_objects.py@one_rank_resumes",),
    ),
    Mutant(
        "noise-state-without-seed-taken-silently",
        "tram/_noise_stream.py",
        "        elif self.seed_given:",
        "        elif True:",
        (
            "tests/test_noise_stream.py@needs_the_seed_given",
            "tests/test_guarantees.py@refused_state_dict and without",
        ),
    ),
    Mutant(
        "noise-seed-required-of-earlier-checkpoints",
        "tram/_tram.py",
        " and key not in self.target.optional_state",
        "",
        ("tests/test_noise_stream.py@without_a_seed_continues",),
    ),
    Mutant(
        "noise-stream-rank-and-draw-swapped",
        "tram/_noise_stream.py",
        "    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ rank) ^ draw)",
        "    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ draw) ^ rank)",
        ("tests/test_noise_stream.py@pinned",),
    ),
    Mutant(
        "step-counter-not-loaded",
        "tram/_wrapper.py",
        '            steps = int(wrapper_state.get("steps", 0))',
        "            steps = 0",
        ("tests/test_fabric.py@resume and SAM",),
    ),
    Mutant(
        "fsdp2-gradient-written-in-its-shard-unseen",
        "tram/_step_state.py",
        "    return grad._version, local._version",
        "    return grad._version, 0",
        (
            "tests/test_contract.py@fsdp2_step_closure or fsdp2_second_backward",
            "tests/test_tram_memory.py@recorded_forwards_autocast",
            "tests/test_distributed.py@fsdp2_mixed_precision",
        ),
    ),
    Mutant(
        "sharded-reference-forward-outside-the-recorded-autocast",
        "tram/_recording.py",
        "                stack.enter_context(replay.autocast.context())",
        "                pass",
        ("tests/test_tram_memory.py@recorded_forwards_autocast",),
    ),
    Mutant(
        "first-step-that-raised-not-undone",
        "tram/_wrapper.py",
        "            self._undo_first_step()",
        "            pass",
        ("tests/test_guarantees.py@first_step_that_raises or part_way",),
    ),
    Mutant(
        "first-step-that-raised-leaves-weights-moved",
        "tram/_wrapper.py",
        "        TwoPassOptimizer.restore(self)",
        "        pass",
        ("tests/test_guarantees.py@part_way",),
    ),
    Mutant(
        "interrupted-ascent-leaves-weights-moved",
        "tram/_ascent.py",
        "            p.copy_(backup)\n        raise",
        "            pass\n        raise",
        ("tests/test_guarantees.py@interrupted_inside_a_bucket",),
    ),
    Mutant(
        "refused-state-dict-leaves-the-base-loaded",
        "tram/_wrapper.py",
        "            base.state, base.param_groups = previous_state, previous_groups",
        "            pass",
        ("tests/test_guarantees.py@refused_state_dict",),
    ),
    Mutant(
        "reference-shapes-not-checked-before-copying",
        "tram/targets.py",
        "        if mismatched:",
        "        if False:",
        ("tests/test_guarantees.py@refused_state_dict and shapes",),
    ),
    Mutant(
        "sparse-gradient-not-refused",
        "tram/_buckets.py",
        "            if grad.is_sparse:",
        "            if False:",
        ("tests/test_contract.py@sparse_gradient",),
    ),
    Mutant(
        "joined-ranks-not-checked",
        "tram/_recording.py",
        "            _require_every_rank(totals.device)",
        "            pass",
        ("tests/test_tram_distributed.py@under_join",),
    ),
    Mutant(
        "joined-ranks-counted-the-wrong-way",
        "tram/_recording.py",
        "    if ranks != world_size:",
        "    if ranks > world_size:",
        ("tests/test_tram_distributed.py@under_join",),
    ),
    Mutant(
        "radius-not-all-reduced",
        "tram/_recording.py",
        "            dist.all_reduce(totals)",
        "            pass",
        ("tests/test_tram_distributed.py@synchronised or fsdp2_tram_x",),
    ),
    Mutant(
        "adapter-off-output-ignores-set-adapter",
        "tram/adapters.py",
        "        self._follow_active_adapters()\n        if self._unsupported is not None:\n"
        "            raise ValueError(self._unsupported)\n"
        "        if self._not_initial is not None:",
        "        if self._unsupported is not None:\n"
        "            raise ValueError(self._unsupported)\n"
        "        if self._not_initial is not None:",
        ("tests/test_peft.py@set_active_after_it_was_built",),
    ),
    Mutant(
        "adapter-off-unchecked-before-base-step",
        "tram/adapters.py",
        'a skipped ascent)."""\n        self._follow_active_adapters()',
        'a skipped ascent)."""',
        ("tests/test_peft.py::test_adapter_off_checks_an_adapter_set_active_on_a_step_without_d",),
    ),
    Mutant(
        "adapter-off-rollback-forgets-refusal",
        "tram/adapters.py",
        '            "not_initial": self._not_initial,',
        '            "not_initial": None,',
        (
            "tests/test_peft.py::"
            "test_adapter_off_refuses_a_trained_adapter_set_active_after_it_was_built",
        ),
    ),
    Mutant(
        "adapter-off-checked-not-saved",
        "tram/adapters.py",
        '            "checked": [[index, adapter] for index, adapter in sorted(self._checked)],',
        "",
        ("tests/test_peft.py::test_adapter_off_resumes_across_adapter_switches",),
    ),
    Mutant(
        "adapter-off-merge-unwatched",
        "tram/adapters.py",
        "(tuple(layer.active_adapters), bool(layer.merged))",
        "(tuple(layer.active_adapters), False)",
        ("tests/test_peft.py::test_adapter_off_refuses_a_layer_merged_after_it_was_bound",),
    ),
    Mutant(
        "second-pass-buffers-kept",
        "tram/_wrapper.py",
        "            state.saved_buffers = save_buffers(self.model)",
        "            pass",
        ("tests/test_contract.py@forward_written and model-closure and SAM",),
    ),
    Mutant(
        "reference-forward-buffers-kept",
        "tram/_recording.py",
        "                stack.enter_context(buffers_put_back(self.module))",
        "                pass",
        ("tests/test_contract.py@forward_written and model-closure and TRAM",),
    ),
    Mutant(
        "guard-saves-no-buffers",
        "tram/batchnorm.py",
        "        save(module)\n",
        "",
        ("tests/test_contract.py@forward_written and no-model and SAM",),
    ),
    Mutant(
        "replaced-buffer-left-replaced",
        "tram/_forward_state.py",
        "            buffers[entry.name] = entry.tensor",
        "            pass",
        ("tests/test_contract.py@forward_written and model-closure and SAM",),
    ),
    Mutant(
        "r3f-noised-forward-buffers-kept",
        "tram/regularizers.py",
        "            buffers_put_back(model),\n",
        "",
        (
            "tests/test_regularizers.py::"
            "test_the_r4f_noised_forward_leaves_the_spectral_norm_to_the_clean_forward",
        ),
    ),
    Mutant(
        "guard-saves-the-called-module-only",
        "tram/batchnorm.py",
        "        for inner in module.modules():\n            if id(inner) not in saved_modules:",
        "        for inner in (module,):\n            if id(inner) not in saved_modules:",
        ("tests/test_contract.py@forward_written and no-model and SAM",),
    ),
    Mutant(
        "restore-copies-only-versioned-writes",
        "tram/_forward_state.py",
        "live._version == entry.version and torch.equal(live, copy)",
        "live._version == entry.version",
        ("tests/test_forward_state.py::test_quantisation_observers_come_from_the_first_pass_only",),
    ),
    Mutant(
        "second-pass-outside-buffers-kept",
        "tram/_wrapper.py",
        "        state.saved_buffers.extend(save_buffers_outside(self.model, "
        "every_module_with_buffers()))",
        "        pass",
        ("tests/test_forward_state.py@another_networks",),
    ),
    Mutant(
        "buffer-registry-deaf-to-new-modules",
        "tram/batchnorm.py",
        "        self._with_buffers[id(module)] = weakref.ref(module)\n        if name ==",
        "        if name ==",
        ("tests/test_forward_state.py@another_networks",),
    ),
    Mutant(
        "stale-tram-entry-loaded",
        "tram/_wrapper.py",
        "        wrapper_state = self._unless_stale(wrapper_state, state_dict)\n",
        "",
        (
            "tests/test_guarantees.py::"
            "test_trams_state_saved_again_by_a_plain_optimizer_that_stepped_is_ignored",
        ),
    ),
    Mutant(
        "buffer-restore-asks-get",
        "tram/_forward_state.py",
        "        current = buffers[entry.name] if entry.name in buffers else None  # noqa: SIM401",
        "        current = buffers.get(entry.name)",
        ("tests/test_forward_state.py@scripted",),
    ),
    Mutant(
        "unreached-gradient-dropped-after-zero-grad-without-set-to-none",
        "tram/_wrapper.py",
        "        if not state.zero_grad_sets_to_none:\n            return\n",
        "",
        ("tests/test_guarantees.py@unreached_weight_steps_on_zeros",),
    ),
    Mutant(
        "missing-second-pass-told-by-none-gradients-alone",
        "tram/_wrapper.py",
        "                if squared_gradient_norm(grads, self._use_foreach(ascent_params)) == 0.0:",
        "                if all(param.grad is None for param in ascent_params):",
        ("tests/test_guarantees.py@second_step_without_a_second_backward_raises",),
    ),
    Mutant(
        "copy-keeps-a-schedulers-step-closure",
        "tram/_wrapper.py",
        "            if not inspect.isroutine(inspect.getattr_static(type(self), name, None))",
        "            if name",
        ("tests/test_contract.py@copy_then_steps_like_the_original and scheduler",),
    ),
    Mutant(
        "base-optimizers-loads-not-followed",
        "tram/_wrapper.py",
        "        self._follow_the_base_optimizers_loads()\n        self._backups",
        "        self._backups",
        ("tests/test_contract.py@base_optimizer_alone_relinks",),
    ),
    Mutant(
        "base-optimizers-loads-not-followed-by-a-copy",
        "tram/_wrapper.py",
        "        self._relink()\n        self._follow_the_base_optimizers_loads()\n\n",
        "        self._relink()\n\n",
        ("tests/test_contract.py@base_optimizer_alone_relinks",),
    ),
    Mutant(
        "first-step-inside-a-filled-parametrize-cache-accepted",
        "tram/_wrapper.py",
        "            refuse_a_filled_cache(type(self).__name__)\n",
        "",
        ("tests/test_guarantees.py@step_inside_parametrize_cached_is_refused",),
    ),
    Mutant(
        "reference-forward-shares-the-parametrize-cache",
        "tram/_recording.py",
        "                stack.enter_context(uncached())\n",
        "",
        ("tests/test_guarantees.py@parametrize_cached_inside_the_closure",),
    ),
    Mutant(
        "reference-weights-forward-shares-the-parametrize-cache",
        "tram/targets.py",
        "            stack.enter_context(uncached())\n",
        "",
        ("tests/test_regularizers.py@parametrize_cached",),
    ),
    Mutant(
        "zero-grad-mode-not-recorded",
        "tram/_wrapper.py",
        "            state.zero_grad_sets_to_none = bool(set_to_none)",
        "            state.zero_grad_sets_to_none = True",
        ("tests/test_guarantees.py@unreached_weight_steps_on_zeros",),
    ),
]


def pytest_arguments(tests: tuple[str, ...]) -> list[list[str]]:
    """One pytest invocation per entry: ``node`` or ``node@keyword expression``."""
    out = []
    for entry in tests:
        node, _, keyword = entry.partition("@")
        out.append([node, "-k", keyword] if keyword else [node])
    return out


def copy_tree(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = ROOT / relative
        if not source.is_file():  # deleted in the work tree but still in the index
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Run each entry of ``tests``; map the entries that failed to the tail of their output."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    failed = {}
    for entry, arguments in zip(tests, pytest_arguments(tests), strict=True):
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        command += ["-m", "", *arguments]
        result = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
        output = result.stdout + result.stderr
        if result.returncode == 5:
            raise SystemExit(f"no test selected by {arguments} in {root}:\n{output[-2000:]}")
        if result.returncode != 0:
            failed[entry] = output[-1500:]
    return failed


def check_imports_from(root: Path) -> None:
    """The copy must shadow any installed ``tram`` (an editable install points elsewhere)."""
    found = subprocess.run(
        [sys.executable, "-c", "import tram; print(tram.__file__)"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the copy imports tram from {found}, not from {root}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run the mutants whose name contains one")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}: {mutant.path}: {mutant.original!r} -> {mutant.mutated!r}")
        return 0
    if not chosen:
        raise SystemExit(f"no mutant matches {args.names}")

    failures = 0
    with tempfile.TemporaryDirectory(prefix="tram-mutants-") as scratch:
        baseline = Path(scratch) / "baseline"
        copy_tree(baseline)
        check_imports_from(baseline)
        # Every mutant must still apply before any runs: a stale one found after twenty
        # minutes of the others would stop the run there.
        stale = [problem for mutant in chosen if (problem := mutant.stale(baseline)) is not None]
        if stale:
            raise SystemExit("\n".join(stale))
        for mutant in chosen:
            start = time.perf_counter()
            broken = run_tests(baseline, mutant.tests, args.timeout)
            if broken:
                print(f"BASELINE FAILS  {mutant.name}: {', '.join(broken)}")
                print(*broken.values(), sep="\n")
                failures += 1
                continue
            copy = Path(scratch) / mutant.name
            shutil.copytree(baseline, copy)
            mutant.apply(copy)
            killers = run_tests(copy, mutant.tests, args.timeout)
            shutil.rmtree(copy)
            seconds = time.perf_counter() - start
            if killers:
                print(f"killed   {mutant.name} by {', '.join(killers)} ({seconds:.0f} s)")
            else:
                print(f"SURVIVED {mutant.name}: {', '.join(mutant.tests)} ({seconds:.0f} s)")
                failures += 1
            sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
