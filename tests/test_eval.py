"""eval.py and evaluation/: BPB and importance as training measures them, the ablation curve, the KV cache, the
harness adapter. lm-eval is imported only inside the harness tests: collecting this file (e.g. `pytest -m gpu`) must
work where it is not installed."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data.tokenizer import ByteTokenizer
from evaluation.loading import Runtime, build_data, checkpoint_path, label_of, load_checkpoint
from evaluation.metrics import ablation_masks, measure, rows_fingerprint, validation_batches
from evaluation.report import report
from evaluation.sinks import attention_on_starts, document_starts, key_attention, sink_attention
from model.attention import VARIANTS
from model.generate import generate
from model.gpt import GPT, GPTConfig, KVCache
from model.lit import SinkAwareLM

ROOT = Path(__file__).parents[1]
CACHE = str(ROOT / ".cache")
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "seq_len": 32, "backend": "reference"}
ROWS = 8  # validation rows: 2 batches of 4


def eval_config(out_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                f"paths.cache_dir={CACHE}",
                f"paths.output_dir={out_dir}",
                "data.batch_size=4",
                f"samples={ROWS}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sink-attention model after 4 steps of Trainer.fit, validated on ROWS rows at the end."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = eval_config(tmp)
    model_cfg = {**TINY, "attention": "sink", "vocab_size": ByteTokenizer().vocab_size}
    datamodule = build_data(cfg, model_cfg)
    optim = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/optim/adamw.yaml"))
    aux = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/aux/default.yaml"))
    module = SinkAwareLM(model=model_cfg, optim={**optim, "warmup_steps": 1}, aux=aux)
    trainer = quiet_trainer(
        max_steps=4,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=ROWS // 4,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    return {"path": path, "module": module, "val_bpb": trainer.callback_metrics["val/bpb"].item(), "tmp": tmp}


def test_report_bpb_importance_and_ablation_match_training(trained, tmp_path):
    cfg = eval_config(tmp_path, f"ckpt={trained['path']}")
    runtime = Runtime("cpu", "fp32")
    result = report(cfg, trained["path"], tmp_path, runtime, "tiny")

    assert result["rows"] == ROWS and result["step"] == 4
    assert result["bpb"] == pytest.approx(trained["val_bpb"], rel=1e-6)  # the training-time validation BPB

    curve = result["ablation"]
    assert curve["k"] == [0, 1, 2]
    assert curve["least_important"][0] == result["bpb"] == curve["most_important"][0]  # k = 0: nothing off
    assert curve["least_important"][-1] != result["bpb"]  # all heads off: a different model

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["bpb"] == result["bpb"] and len(saved["importance"]) == TINY["n_layer"]
    imp = torch.tensor(saved["importance"])
    assert saved["sink_ratio"] == (imp < 0.7).float().mean(1).tolist()  # threshold 0.3: a gate below 0.7 sinks
    assert saved["scored_rows"]["count"] == ROWS and saved["scored_rows"]["command"] is None  # not run by eval.py
    assert len((tmp_path / "documents.txt").read_text().splitlines()) == saved["scored_rows"]["documents"]
    assert len(saved["sinks"]["position0"]["attention"]) == TINY["n_layer"] and (tmp_path / "sinks.png").exists()
    assert (tmp_path / "importance.png").stat().st_size > 0 and (tmp_path / "ablation.png").stat().st_size > 0


def test_importance_equals_the_modules_on_the_same_batch(trained, tmp_path):
    cfg = eval_config(tmp_path)
    module = trained["module"].eval()
    datamodule = build_data(cfg, module.hparams.model)
    batch = next(iter(datamodule.loader("validation")))
    with torch.no_grad():
        _, module_imp, _ = module.step(batch)
    measured = measure(module.model, [batch], Runtime("cpu", "fp32"))
    torch.testing.assert_close(measured["importance"].float(), module_imp, rtol=1e-6, atol=1e-7)


def test_ablation_masks_switch_off_the_right_heads():
    imp = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
    least = ablation_masks(imp, 1, least=True)
    most = ablation_masks(imp, 2, least=False)
    assert least.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert most.tolist() == [[0, 1, 0], [1, 0, 0]]


def random_model(attention: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_embd=64, n_head=4, seq_len=32, attention=attention))
    with torch.no_grad():
        for parameter in model.parameters():  # non-zero output projections and gates: every path matters
            parameter.normal_(std=0.3)
    return model.eval()


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_kv_cache_gives_the_full_forward_logits_and_gates_at_every_step(attention):
    model = random_model(attention)
    tokens = torch.randint(0, 64, (2, 20))
    cache = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        model(tokens[:, :6], cache=cache)  # prompt
        for t in range(6, 20):
            step_logits, step_gates = model(tokens[:, t : t + 1], cache=cache)
            full_logits, full_gates = model(tokens[:, : t + 1])
            torch.testing.assert_close(step_logits[:, 0], full_logits[:, -1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step_gates[..., 0], full_gates[..., -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_greedy_generation_with_the_cache_equals_recomputing_everything(attention):
    model = random_model(attention)
    idx = torch.randint(0, 64, (2, 5))
    cached = torch.cat(list(generate(model, idx, 12, temperature=0.0)), dim=1)
    sequence = idx
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(sequence)
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, sequence[:, 5:])


def next_byte_model(shift: int, scale: float = 10.0) -> GPT:
    """A byte-level model that predicts token i + shift after token i. Fresh blocks are the identity (zero
    output projections), so with one-hot embeddings the logits are lm_head's column of the last token."""
    vocab = ByteTokenizer().vocab_size
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_embd=vocab, n_head=5, seq_len=64))
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(scale * torch.eye(vocab).roll(shift, dims=0))
    return model.eval()


def harness_lm(model: GPT):
    from evaluation.harness import HarnessLM

    return HarnessLM(model, ByteTokenizer(), Runtime("cpu", "fp32"), batch_size=3)


def write_echo_task(folder: Path) -> None:
    """A multiple-choice task in lm-eval's custom YAML format: the answer repeats the question's letter."""
    docs = [
        {"question": letter, "choices": choices, "answer": choices.index(letter)}
        for letter, choices in [("q", ["q", "x", "m"]), ("k", ["a", "b", "k"]), ("z", ["c", "z", "d"])]
    ]
    (folder / "echo.jsonl").write_text("\n".join(json.dumps(doc) for doc in docs))
    (folder / "echo.yaml").write_text(
        "task: echo_letter\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'echo.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Repeat: {{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_harness_task_scores_100_percent_with_a_model_that_knows_the_answers(tmp_path):
    from evaluation.harness import load_tasks, run_tasks

    write_echo_task(tmp_path)
    cfg = OmegaConf.create(
        {
            "tasks": ["echo_letter"],
            "harness": {
                "include_path": str(tmp_path),
                "include_defaults": False,  # only the task written here: skips indexing lm-eval's thousands
                "limit": None,
                "num_fewshot": None,
                "bootstrap_iters": 0,
            },
        }
    )
    tasks = load_tasks(cfg)
    knows = run_tasks(harness_lm(next_byte_model(shift=0)), cfg, tasks)
    assert knows["echo_letter"]["acc,none"] == 1.0
    contrary = run_tasks(harness_lm(next_byte_model(shift=0, scale=-10.0)), cfg, tasks)
    assert contrary["echo_letter"]["acc,none"] == 0.0  # the same plumbing can fail


class Request:  # what the harness hands the model: an object with .args
    def __init__(self, *args):
        self.args = args


def test_harness_rolling_loglikelihood_and_generation():
    model = next_byte_model(shift=1)
    lm = harness_lm(model)
    text = "abcdefghij" * 10  # 100 bytes: longer than the context of 64, so several windows
    ids = torch.tensor([ByteTokenizer.bos_id, *text.encode()])
    # A bigram model: each byte's log-probability depends on the previous byte only, so any windowing that
    # scores every byte exactly once gives the sum over all 100 of them.
    expected = 0.0
    with torch.no_grad():
        for start in (0, 50):
            logprobs = model(ids[None, start : start + 50])[0].log_softmax(-1)[0]
            expected += logprobs.gather(1, ids[start + 1 : start + 51, None]).sum().item()
    assert lm.loglikelihood_rolling([Request(text)]) == [pytest.approx(expected, rel=1e-5)]
    assert lm.generate_until([Request("xa", {"until": ["e"], "max_gen_toks": 10})]) == ["bcd"]


@pytest.mark.slow
def test_cli_sample_hf_diagnosis_compare_and_a_missing_checkpoint(trained, tmp_path):
    from test_hf import save_tiny_model

    env = {**os.environ, "SINKAWARE_CACHE_DIR": CACHE}
    code = (  # both commands in one process: importing Lightning alone takes seconds
        "import runpy, sys\n"
        "for argv in sys.argv[1:]:\n"
        "    sys.argv = ['eval.py', *argv.split(' ')]\n"
        "    try:\n"
        "        runpy.run_path('eval.py', run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code)\n"
    )
    sample = f"eval_mode=sample ckpt={trained['path']} prompt=def num_samples=2 max_new_tokens=8 top_k=5 seed=1"
    missing = f"ckpt={tmp_path}/nothing.ckpt"
    hf = f"eval_mode=diagnose hf_model={save_tiny_model(tmp_path / 'hf', 'llama')} samples=3"
    compared = f"eval_mode=compare ckpts=[{trained['path']},{trained['path']}] ablation.samples=0"
    runs = [f"{args} hydra.run.dir={tmp_path}/{i}" for i, args in enumerate([sample, missing, hf, compared])]
    result = subprocess.run([sys.executable, "-c", code, *runs], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert output.count("--- sample") == 2 and "\ndef" in output
    assert "nothing.ckpt: no such file" in output and "exit 1" in output
    assert "Traceback" not in output
    hf_report = json.loads((tmp_path / "2" / "report.json").read_text())
    imp = torch.tensor(hf_report["importance"])
    assert hf_report["documents"] == 3 and imp.shape == (2, 4) and ((imp > 0) & (imp < 1)).all()
    assert hf_report["cv_mean"] == pytest.approx((imp.std(1, unbiased=False) / imp.mean(1)).mean().item(), rel=1e-5)
    assert (tmp_path / "2" / "importance.png").exists()
    table = (tmp_path / "3" / "compare.md").read_text().splitlines()
    assert len(table) == 4 and table[2].split("|")[4:] == table[3].split("|")[4:]  # the same checkpoint twice
    assert (tmp_path / "3" / "importance_compare.png").exists() and (tmp_path / "3" / "1" / "report.json").exists()
    assert (tmp_path / "3" / "sinks_compare.png").exists()
    rows = [r["scored_rows"] for r in json.loads((tmp_path / "3" / "compare.json").read_text())]
    command = shlex.split(rows[0]["command"].split(" && ")[1])
    assert rows[0] == rows[1] and command == ["python", "eval.py", *compared.split(" ")]  # the command to rerun


def test_run_name_and_bad_checkpoints_give_one_line_errors(tmp_path):
    last = tmp_path / "myrun" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    cfg = OmegaConf.create({"ckpt": None, "run": "myrun", "runs_dir": str(tmp_path)})
    assert checkpoint_path(cfg) == last
    assert label_of(last) == "myrun/last.ckpt"
    with pytest.raises(ValueError, match="last.ckpt: not a readable checkpoint"):
        load_checkpoint(last, "auto")
    with pytest.raises(FileNotFoundError, match="run=other: no last.ckpt under"):
        checkpoint_path(OmegaConf.merge(cfg, {"run": "other"}))
    with pytest.raises(ValueError, match="exactly one of ckpt=PATH"):
        checkpoint_path(OmegaConf.merge(cfg, {"run": None}))


BLOCK_LM_EVAL = "sys.modules['lm_eval'] = None"  # `import lm_eval` then fails as if lm-eval were not installed


def test_this_file_is_collected_without_lm_eval():
    code = f"import sys; {BLOCK_LM_EVAL}; sys.path.insert(0, 'tests'); import test_eval"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def write_hub_task(folder: Path) -> None:
    """A task whose data is on the Hugging Face hub: unreachable with HF_DATASETS_OFFLINE=1 and an empty cache."""
    (folder / "hub.yaml").write_text(
        "task: hub_task\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices.text}}'\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )


@pytest.mark.slow
def test_tasks_that_cannot_run_keep_the_report_and_fail_in_one_line(trained, tmp_path):
    """Without lm-eval, and with a task whose data is neither cached nor reachable: report.json still holds BPB, the
    tasks' error is recorded there, and eval.py exits 1 with one line."""
    write_hub_task(tmp_path)
    empty_cache = tmp_path / "hf"
    env = {**os.environ, "SINKAWARE_CACHE_DIR": CACHE, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(empty_cache)}  # fmt: skip
    code = (  # both runs in one process (importing Lightning alone takes seconds); the first without lm-eval
        "import runpy, sys\n"
        "for i, argv in enumerate(sys.argv[1:]):\n"
        f"    if i == 0: {BLOCK_LM_EVAL}\n"
        "    else: sys.modules.pop('lm_eval', None)\n"
        "    sys.argv = ['eval.py', *argv.split(' ')]\n"
        "    try:\n"
        "        runpy.run_path('eval.py', run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code)\n"
    )
    common = f"ckpt={trained['path']} samples={ROWS} data.batch_size=4 ablation.samples=0"
    tasks = f"harness.include_path={tmp_path} harness.include_defaults=false"
    runs = [f"{common} tasks=[hub_task] {tasks} hydra.run.dir={tmp_path}/{i}" for i in range(2)]
    result = subprocess.run([sys.executable, "-c", code, *runs], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert output.count("exit 1") == 2 and "Traceback" not in output, output
    for i, why in enumerate(["needs lm-evaluation-harness", "loading the task data failed (ConnectionError"]):
        saved = json.loads((tmp_path / str(i) / "report.json").read_text())
        assert saved["bpb"] == pytest.approx(trained["val_bpb"], rel=1e-6) and "tasks" not in saved
        assert why in saved["errors"]["tasks"] and "\n" not in saved["errors"]["tasks"]
        error_lines = [line for line in output.splitlines() if why in line]
        assert len(error_lines) == 2  # logged when found (before the long part) and as eval.py's exit message


def test_scored_rows_are_the_same_every_time_and_their_documents_are_recorded(tmp_path):
    cfg = eval_config(tmp_path)
    datamodule = build_data(cfg, {**TINY, "vocab_size": ByteTokenizer().vocab_size})
    batches, ids = validation_batches(datamodule, ROWS)
    again, same_ids = validation_batches(datamodule, ROWS)
    assert rows_fingerprint(batches, ids) == rows_fingerprint(again, same_ids) and ids == same_ids
    loader_rows = torch.cat([b["input_ids"] for b in datamodule.loader("validation")])[:ROWS]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), loader_rows)  # the training validation's rows
    texts = {}
    for doc in datamodule.corpus.documents("validation", cfg.seed):
        texts[doc["id"]] = doc["text"]
        if len(texts) > len(ids):
            break
    streams = [[ByteTokenizer.bos_id, *ByteTokenizer().encode(texts[doc_id])] for doc_id in ids]
    assert batches[0]["input_ids"][0].tolist() == sum(streams, [])[: TINY["seq_len"]]  # the first document(s)
    tail = torch.cat([batches[-1]["input_ids"][-1, -8:], batches[-1]["targets"][-1, -1:]]).tolist()
    assert str(tail)[1:-1] in str(streams[-1])  # the last row ends inside the last recorded document


def test_document_starts_are_the_nearest_bos_at_or_before_each_position():
    bos = 9
    idx = torch.tensor([[bos, 1, 2, bos, 4, bos, bos, 7], [5, 1, 2, 3, bos, 4, 4, 4]])
    assert document_starts(idx, bos).tolist() == [[0, 0, 0, 3, 3, 5, 6, 6], [0, 0, 0, 0, 4, 4, 4, 4]]


def test_attention_on_position_0_and_on_the_own_document_start_by_hand():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.1, 0.6, 0.2]])
    starts = torch.tensor([[0, 0, 2, 2]])  # a document starts at 2
    first, own = attention_on_starts(probs[None, None], starts)  # queries t = 1, 2, 3
    assert first.tolist() == [pytest.approx(0.5 + 0.2 + 0.1)] and own.tolist() == [pytest.approx(0.5 + 0.5 + 0.6)]


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_explicit_attention_agrees_with_the_models_own_gates(attention):
    """Vanilla: the attention on position 0 is 1 - G; sink: the keys share G (the sink logit has 1 - G); gated: 1."""
    model = random_model(attention)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        gates = model(idx)[1][0]
        x = model.blocks[0].norm(torch.nn.functional.rms_norm(model.wte(idx), (64,)))
        probs = key_attention(model.blocks[0].attn, x, model.rope_cos, model.rope_sin)
    expected = {"vanilla": (probs[..., 0], 1 - gates), "sink": (probs.sum(-1), gates)}
    got, want = expected.get(attention, (probs.sum(-1), torch.ones_like(gates)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def forced_qk(x, cos, sin, bos_positions=(0, 5, 12), D=16):
    """Every query attends to its latest BOS: key s scores 100·(s + 1)·sqrt(D) if s is a BOS position, else 0."""
    T = x.size(1)
    q = torch.zeros(1, 4, T, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 4, T, D)
    for s in bos_positions:
        k[..., s, 0] = 100.0 * (s + 1) * D**0.5
    return q, k


@pytest.mark.parametrize("attention", ["vanilla", "sink"])
def test_heads_that_sink_on_document_starts_are_told_apart_from_position_0(attention):
    """A row of three documents (BOS at 0, 5, 12) whose heads all attend to the latest BOS: queries t = 1..4 put all
    their attention on position 0, which is also their document's start; t = 5..15 put it on 5 or 12."""
    model = random_model(attention)
    for block in model.blocks:
        block.attn.rotated_qk = forced_qk
        if attention == "sink":
            block.attn.sink_logit.data.fill_(-1e4)  # the sink logit takes nothing: G = 1
    bos = 63
    row = torch.randint(0, 60, (1, 16))
    row[0, [0, 5, 12]] = bos
    result = sink_attention(model, [{"input_ids": row}], 1, bos, 0.3, Runtime("cpu", "fp32"))
    assert result["queries"] == 15 and result["later_document_share"] == pytest.approx(11 / 15)
    torch.testing.assert_close(torch.tensor(result["position0"]["attention"]), torch.full((2, 4), 4 / 15))
    torch.testing.assert_close(torch.tensor(result["document_start"]["attention"]), torch.ones(2, 4))
    assert result["position0"]["sink_ratio_mean"] == 0.0 and result["document_start"]["sink_ratio_mean"] == 1.0


def test_uniform_attention_gives_the_hand_computed_means():
    """q = 0 (zero query weights): every score is 0, so a query at t gives 1/(t + 1) to each key; with a sink logit
    of 0 the keys share G = (t + 1)/(t + 2), 1/(t + 2) each."""
    for attention, extra in (("vanilla", 1), ("gated", 1), ("sink", 2)):
        model = random_model(attention)
        for block in model.blocks:
            block.attn.c_q.weight.data.zero_()
            if attention == "sink":
                block.attn.sink_logit.data.zero_()
        row = torch.randint(0, 60, (1, 16))
        row[0, 7] = 63
        result = sink_attention(model, [{"input_ids": row}], 1, 63, 0.1, Runtime("cpu", "fp32"))
        mean = sum(1 / (t + extra) for t in range(1, 16)) / 15
        for name in ("position0", "document_start"):  # uniform: the same on every key
            torch.testing.assert_close(torch.tensor(result[name]["attention"]), torch.full((2, 4), mean))
            assert result[name]["sink_ratio_mean"] == float(mean > 0.1)
