"""The params schema: every profile validates; bad values fail at once, naming key and allowed values."""

import os
from pathlib import Path

import pytest
import yaml

from ftstudy.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _params(**overrides):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return raw


def test_committed_params_validate():
    assert load_params(ROOT / "params.yaml").profile == "embedded"


@pytest.mark.parametrize("profile", ["embedded", "full", "micro", "study_random"])
def test_every_profile_composes_and_validates(profile, tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, os.fspath(ROOT / "conf"), None, "config", "", [f"profile={profile}"])
    assert load_params(out).profile == profile


def test_committed_params_are_the_composed_embedded_profile(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, os.fspath(ROOT / "conf"), None, "config", "", [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_param_named_in_dvc_yaml_exists():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            if isinstance(key, dict):
                continue  # whole-file tracking (validate_params)
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: params key {key} not in params.yaml"
                node = node[part]


def test_unknown_key_names_the_allowed_keys():
    with pytest.raises(ParamsError) as e:
        parse_params(_params(evaluate__max_new_tokenz=5))
    assert "evaluate.max_new_tokenz: unknown key" in str(e.value)
    assert "max_new_tokens" in str(e.value)


def test_negative_count_names_key_and_range():
    with pytest.raises(ParamsError, match=r"data.train_per_source: -5 is out of range; allowed: >= 1"):
        parse_params(_params(data__train_per_source=-5))


def test_unknown_source_names_allowed_values():
    with pytest.raises(ParamsError, match=r"data.sources: unknown \['dolly'\].*alpaca, tulu, ultrachat"):
        parse_params(_params(data__sources=["alpaca", "dolly"]))


def test_wrong_type_and_choice():
    with pytest.raises(ParamsError) as e:
        parse_params(_params(seed="abc", model__source="s3", evaluate__batch_size=True))
    msg = str(e.value)
    assert "seed: expected an integer, got 'abc'" in msg
    assert "model.source: 's3' is not allowed; allowed values: gguf, hub, random, tiny_random" in msg
    assert "evaluate.batch_size: expected an integer, got True" in msg  # all three reported at once


def test_sample_counts_larger_than_the_pool():
    with pytest.raises(ParamsError, match="exceeds data.pool_per_source"):
        parse_params(_params(data__pool_per_source=100))


def test_layerwise_galore_refuses_gradient_accumulation():
    with pytest.raises(ParamsError, match=r"train_galore.optimizer=galore_adamw_layerwise with train.grad_accum=4"):
        parse_params(_params(train__grad_accum=4))


def test_keep_activations_needs_checkpointing_and_no_fsdp():
    with pytest.raises(ParamsError, match=r"train.keep_activations: 2 .* which is off; allowed: 0, or "
                                          r"train.gradient_checkpointing: true"):
        parse_params(_params(train__keep_activations=2))
    with pytest.raises(ParamsError, match="FSDP checkpoints every layer itself"):
        parse_params(_params(train__keep_activations=2, train__gradient_checkpointing=True, train__num_processes=2,
                             train__strategy="fsdp"))
    parse_params(_params(train__keep_activations=2, train__gradient_checkpointing=True))


def test_bad_training_values_name_key_and_range():
    with pytest.raises(ParamsError) as e:
        parse_params(_params(train_qlora__lora_r=0, train_galore__learning_rate="fast", train_lora_wide__target_modules=["qkv"],
                             train_galore__optimizer="adam8"))
    msg = str(e.value)
    assert "train_qlora.lora_r: 0 is out of range; allowed: >= 1 and <= 4096" in msg
    assert "train_galore.learning_rate: expected a number, got 'fast'" in msg
    assert "train_lora_wide.target_modules: unknown ['qkv']" in msg
    assert "train_galore.optimizer: 'adam8' is not allowed; allowed values: galore_adamw, galore_adamw_layerwise" in msg


def test_yaml_style_exponent_floats_are_accepted():
    assert parse_params(_params(train_qlora__learning_rate="2e-4")).train_qlora.learning_rate == 2e-4


def test_rerank_needs_two_different_trained_models():
    with pytest.raises(ParamsError, match="rerank.proposer / rerank.scorer"):
        parse_params(_params(rerank__proposer="galore"))
    with pytest.raises(ParamsError, match=r"rerank.k: 0 is out of range"):
        parse_params(_params(rerank__k=0))


def test_random_architectures_in_the_schema_are_those_the_models_know():
    from ftstudy.arch import ARCHS
    from ftstudy.params import ARCH_NAMES

    assert set(ARCH_NAMES) == set(ARCHS)


def test_unknown_random_architecture_names_the_allowed_ones():
    with pytest.raises(ParamsError, match="model.random.arch: 'gemma-3-27b' is not allowed; allowed values: gemma-3-1b"):
        parse_params(_params(model__random__arch="gemma-3-27b"))


@pytest.mark.parametrize("profile", ["embedded", "full", "micro", "study_random"])
def test_default_params_compose_each_profile_as_hydra_does(profile, tmp_path):
    """Tests and benchmarks build params with default_params(): the same values `dvc exp run` composes."""
    from dvc.utils.hydra import compose_and_dump

    from ftstudy.params import compose

    out = tmp_path / "params.yaml"
    compose_and_dump(out, os.fspath(ROOT / "conf"), None, "config", "", [f"profile={profile}"])
    assert compose(profile) == yaml.safe_load(out.read_text())


def test_a_missing_key_is_an_error_not_a_silent_default():
    raw = _params()
    del raw["train"]["max_seq_len"], raw["rerank"]["k"]
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert "train.max_seq_len: missing" in str(e.value) and "rerank.k: missing" in str(e.value)


def test_a_budget_per_method_is_refused_with_the_shared_one_named():
    """Equal budgets: a step count for one method alone would compare unequal budgets."""
    with pytest.raises(ParamsError) as e:
        parse_params(_params(train_galore__max_steps=10))
    assert "train_galore.max_steps: unknown key" in str(e.value)
    assert "one budget, train.max_steps" in str(e.value) and "unequal budgets" in str(e.value)


def test_the_hybrid_split_must_leave_each_phase_a_step():
    with pytest.raises(ParamsError, match=r"qlora_fraction: 0.01 of train.max_steps=16 gives the hybrid's QLoRA "
                                          r"phase 0 steps"):
        parse_params(_params(train_sequential_ensemble__qlora_fraction=0.01))
    assert parse_params(_params(train_sequential_ensemble__qlora_fraction=0.25)).hybrid_steps == (4, 12)
