"""The online loop with reward components, registry advantages and losses, GRPO and the algorithm registry,
on the tiny model (a few seconds each)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from alignment.algorithms.advantages import get_adv_est
from alignment.algorithms.grpo import GRPOConfig, GRPORecipe, train_grpo
from alignment.algorithms.reinforce import ReinforceConfig, ReinforceError, ReinforceRecipe, train_reinforce
from tests.test_reinforce import assert_same_gradients, step_gradients


def _common(stack, **kw):
    policy, rm, data = stack
    base = dict(policy=str(policy), data=str(data), steps=2, batch_size=2, max_new_tokens=8, learning_rate=1e-3,
                checkpoint_every=2, eval_prompts=0, seed=0, guard_min_distinct2=0.0, guard_max_repetition=1.0,
                bf16=False)
    base.update(kw)
    return base


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Reward components in the loop
# ---------------------------------------------------------------------------------------------
def test_reward_model_and_length_components_train_and_log_each_component(tmp_path, tiny_stack):
    _, rm, _ = tiny_stack
    rewards = [{"kind": "reward_model", "folder": str(rm)}, {"kind": "length", "max_tokens": 8, "buffer": 4,
                                                             "weight": 0.5}]
    config = ReinforceConfig(**_common(tiny_stack, rewards=rewards, steps=3, eval_prompts=2))
    result = train_reinforce(config, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for name in ("reward_model", "length"):
            assert isinstance(r[f"rewards/{name}/mean"], float) and r[f"rewards/{name}/none_share"] == 0.0
        assert -1.0 <= r["rewards/length/mean"] <= 0.0
        # the trained-on total (before KL and EOS shaping) is RM + 0.5 * length
        assert r["rm_reward"] == pytest.approx(r["rewards/reward_model/mean"] + 0.5 * r["rewards/length/mean"],
                                               abs=1e-5)
    assert len({round(r["loss"], 6) for r in rows}) > 1  # the loss moved
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert result.summary["eval_after"]["n"] == 2  # the held-out proxy is the reward-model component
    manifest = json.loads((tmp_path / "run" / "final" / "manifest.json").read_text())
    assert manifest["config"]["rewards"][1]["kind"] == "length"


def test_gold_only_reward_on_the_demo_data(tmp_path, tiny_stack):
    config = ReinforceConfig(**_common(tiny_stack, rewards=[{"kind": "gold"}], steps=1, batch_size=4,
                                       eval_prompts=2))
    train_reinforce(config, tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert row["rewards/gold/none_share"] < 1.0  # the demo's train prompts carry gold answers
    assert row["rewards/gold/mean"] is not None and 0.0 <= row["rewards/gold/mean"] <= 1.0


def test_the_shorthand_keeps_its_stage_key_and_rewards_change_it(tiny_stack):
    from alignment.algorithms.reinforce import reinforce_stage_key
    from alignment.io import read_manifest, sha256_text

    _, rm, data = tiny_stack
    config = ReinforceConfig(**_common(tiny_stack, reward_model=str(rm)))
    # The formula before reward components existed: the config less its inputs, the inputs' keys, the schema.
    cfg = config.model_dump(mode="json", exclude={"reward_model", "data", "independent_reward_models",
                                                  "checkpoint_every_s", "rewards"})
    old = sha256_text(json.dumps([cfg, read_manifest(rm)["stage_key"], read_manifest(data)["stage_key"], {},
                                  "reinforce-schema=3"], sort_keys=True))
    assert reinforce_stage_key(config) == old
    components = ReinforceConfig(**_common(tiny_stack, rewards=[{"kind": "reward_model", "folder": str(rm)}]))
    weighted = ReinforceConfig(**_common(tiny_stack, rewards=[{"kind": "reward_model", "folder": str(rm),
                                                               "weight": 2.0}]))
    assert len({old, reinforce_stage_key(components), reinforce_stage_key(weighted)}) == 3


def test_reward_folders_are_checked_before_any_model_loads(tmp_path, tiny_stack, monkeypatch):
    import alignment.algorithms.online as online

    monkeypatch.setattr(online, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = ReinforceConfig(**_common(tiny_stack, rewards=[{"kind": "gold"}, {"kind": "reward_model", "name": "judge",
                                                                            "folder": str(tmp_path / "nope")}]))
    with pytest.raises(ReinforceError, match=r"rewards\[1\] \(judge\)"):
        train_reinforce(bad, tmp_path / "run")
    _, rm, _ = tiny_stack
    with pytest.raises(ValueError, match="not both"):
        ReinforceConfig(**_common(tiny_stack, reward_model=str(rm), rewards=[{"kind": "gold"}]))
    with pytest.raises(ValueError, match="distinct name"):
        ReinforceConfig(**_common(tiny_stack, rewards=[{"kind": "gold"}, {"kind": "gold", "weight": 2}]))
    with pytest.raises(ReinforceError, match="needs a reward"):
        train_reinforce(ReinforceConfig(**_common(tiny_stack)), tmp_path / "run3")


def test_ppo_accepts_reward_components(tmp_path, tiny_stack):
    from alignment.algorithms.ppo import PPOConfig, PPOError, train_ppo

    _, rm, _ = tiny_stack
    rewards = [{"kind": "reward_model", "folder": str(rm)}, {"kind": "length", "max_tokens": 8, "buffer": 4}]
    config = PPOConfig(**_common(tiny_stack, rewards=rewards, steps=1, ppo_epochs=1, minibatch_size=2))
    train_ppo(config, tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert "rewards/reward_model/mean" in row and "rewards/length/mean" in row
    with pytest.raises(PPOError, match="critic='reward_model'"):
        train_ppo(config.model_copy(update={"critic": "reward_model"}), tmp_path / "run2")


# ---------------------------------------------------------------------------------------------
# Advantages and losses from the registries
# ---------------------------------------------------------------------------------------------
def test_group_baselines_need_k_samples():
    for baseline in ("rloo", "grpo", "dr_grpo"):
        with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
            ReinforceConfig(baseline=baseline, samples_per_prompt=1)
    with pytest.raises(ValueError):
        GRPOConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="int8_rollouts"):
        GRPOConfig(int8_rollouts=True, device="cpu")


def test_grpo_defaults():
    c = GRPOConfig()
    assert (c.section, c.baseline, c.samples_per_prompt, c.loss_agg, c.kl_beta) == ("grpo", "grpo", 4, "token_mean", 0.0)


def test_grpo_advantages_are_what_the_loop_used(tmp_path, tiny_stack, monkeypatch):
    import alignment.algorithms.reinforce as R

    _, rm, _ = tiny_stack
    seen, used = [], []
    real_adv, real_update = R.compute_advantages, GRPORecipe.token_update

    def capture_adv(rewards, config, state, var=None):
        adv, b = real_adv(rewards, config, state, var)
        seen.append((rewards.clone(), adv.clone()))
        return adv, b

    def capture_update(self, ro, graph, advantages):
        used.append(advantages.clone())
        return real_update(self, ro, graph, advantages)

    monkeypatch.setattr(R, "compute_advantages", capture_adv)
    monkeypatch.setattr(GRPORecipe, "token_update", capture_update)
    config = GRPOConfig(**_common(tiny_stack, reward_model=str(rm), samples_per_prompt=2, batch_size=2))
    train_grpo(config, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert len(seen) == len(used) == 2
    for (rewards, adv), given, row in zip(seen, used, rows, strict=True):
        groups = rewards.view(-1, 2)
        expected = ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-6)).reshape(-1)
        assert torch.allclose(adv, expected, atol=1e-6)
        assert torch.equal(adv, get_adv_est("grpo")(rewards, 2, torch.ones(4, 1))[:, 0])
        assert torch.equal(given, adv)  # the update got exactly these
        assert row["reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)
        assert row["advantage"] == pytest.approx(0.0, abs=1e-5)  # group-normalised: mean 0


def test_grpo_clip_is_a_no_op_with_one_update_per_batch(tmp_path, tiny_stack):
    """GRPO's clipped surrogate (ratio 1) gives the gradients of REINFORCE's token-mean loss with the grpo baseline."""
    _, rm, _ = tiny_stack
    common = _common(tiny_stack, reward_model=str(rm), samples_per_prompt=2, batch_size=2, kl_beta=0.0)
    with step_gradients() as grpo:
        train_grpo(GRPOConfig(**common), tmp_path / "grpo")
    with step_gradients() as reinforce:
        train_reinforce(ReinforceConfig(baseline="grpo", loss_agg="token_mean", **common), tmp_path / "reinforce")
    assert_same_gradients(grpo, reinforce, rel=1e-5)
    a, b = _rows(tmp_path / "grpo"), _rows(tmp_path / "reinforce")
    assert [r["sample"] for r in a] == [r["sample"] for r in b]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_token_losses_in_micro_batches_give_the_full_batch_gradient(tmp_path, tiny_stack, loss_agg):
    _, rm, _ = tiny_stack
    full = ReinforceConfig(**_common(tiny_stack, reward_model=str(rm), batch_size=4, micro_batch_size=4,
                                     loss_agg=loss_agg, baseline="ema"))
    with step_gradients() as whole:
        train_reinforce(full, tmp_path / "full")
    with step_gradients() as micro:
        train_reinforce(full.model_copy(update={"micro_batch_size": 1}), tmp_path / "micro")
    assert_same_gradients(whole, micro)
    for x, y in zip(_rows(tmp_path / "full"), _rows(tmp_path / "micro"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# GRPO through the CLI, and the algorithm registry
# ---------------------------------------------------------------------------------------------
def test_cli_grpo_trains_and_writes_final(tmp_path, tiny_stack, capsys):
    from cli.main import main

    policy, rm, data = tiny_stack
    argv = ["-q", "grpo", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out",
            str(tmp_path / "run"), "steps=2", "batch_size=2", "samples_per_prompt=2", "max_new_tokens=8",
            "eval_prompts=2", "bf16=false"]
    assert main(argv) == 0
    assert "policy trained" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    rows = _rows(final)
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl"] == 0.0 for r in rows)  # kl_beta=0: no reference
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["config"]["baseline"] == "grpo"
    assert (final / "summary.json").is_file() and (final / "model.safetensors").is_file()
    assert main(argv) == 0 and "policy reused" in capsys.readouterr().out


class ToyConfig(ReinforceConfig):
    section: str = "toy"


class ToyRecipe(ReinforceRecipe):
    stage = "toy"


def plan_toy(config, runs_dir="runs"):
    from alignment.algorithms.online import online_stage_key, plan_online

    return plan_online(config, online_stage_key(config, "toy-schema=1"), runs_dir)


def train_toy(config, out_dir=None, *, runs_root="runs", stop_after=None, progress=None):
    from alignment.algorithms.online import run_online

    return run_online(ToyRecipe, config, plan_toy(config, runs_root), out_dir, stop_after, progress)


def test_a_registered_algorithm_gets_a_subcommand_and_runs_in_compare(tmp_path, monkeypatch, capsys):
    from alignment.algorithms.registry import ALGORITHMS, AlgorithmSpec
    from alignment.compare import CompareConfig, algorithm_configs, policy_folder
    from cli.main import build_parser

    module = types.ModuleType("toy_algorithm")
    module.ToyConfig, module.train_toy, module.plan_toy = ToyConfig, train_toy, plan_toy
    monkeypatch.setitem(sys.modules, "toy_algorithm", module)
    monkeypatch.setitem(ALGORITHMS, "toy", AlgorithmSpec("toy", "toy_algorithm", "ToyConfig", "train_toy", "plan_toy",
                                                         help="a toy algorithm"))
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["toy", "--help"])
    assert exit_.value.code == 0 and "usage: align toy" in capsys.readouterr().out
    cfg = CompareConfig(data="d", reward_model="r", samples=16, batch_size=8, algorithms=["reinforce", "toy"])
    configs = algorithm_configs(cfg)
    command, toy = configs["toy"]
    assert command == "toy" and isinstance(toy, ToyConfig) and toy.steps * toy.batch_size == 16
    out, policy = policy_folder(command, toy, tmp_path)
    assert out.parent == tmp_path / "toy" and policy == out / "final"
    monkeypatch.delitem(ALGORITHMS, "toy")
    with pytest.raises(ValueError, match="unknown algorithm"):
        CompareConfig(data="d", reward_model="r", algorithms=["toy"])


def test_compare_gives_grpo_the_equal_budget(tmp_path):
    from alignment.compare import CompareConfig, algorithm_configs, policy_folder

    cfg = CompareConfig(data="d", reward_model="r", samples=32, batch_size=8, algorithms=["reinforce", "grpo"])
    command, grpo = algorithm_configs(cfg)["grpo"]
    assert command == "grpo" and isinstance(grpo, GRPOConfig)
    assert grpo.steps * grpo.batch_size * grpo.samples_per_prompt == 32
    assert policy_folder(command, grpo, tmp_path)[0].parent == tmp_path / "grpo"


def test_cli_grpo_takes_presets_and_prints_its_config(capsys):
    from cli.main import main

    assert main(["grpo", "--preset", "demo", "--print-config", "samples_per_prompt=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["section"] == "grpo" and printed["baseline"] == "grpo" and printed["samples_per_prompt"] == 2
