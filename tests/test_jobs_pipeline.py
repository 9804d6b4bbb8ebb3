"""jobs.pipeline end to end on a local Ray cluster: variant FS with the openai engine against a
loopback OpenAI-compatible server (annotation, merging, training, synthesis, labelling by the
frozen F model, extension labels of the synthetic sentences, retraining with β), the run
folder, a rerun that redoes nothing, and grid mode's summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from knowfree_core.formats import read_dataset

pytest.importorskip("ray")
pytest.importorskip("sentence_transformers")
from jobs.pipeline import PipelineConfig, run_pipeline, summary_table  # noqa: E402
from knowfree_core.config import load_structured  # noqa: E402
from model_fixtures import tiny_run_config  # noqa: E402

BETA = 0.4


def _stub_answer(request):
    """P_ent: the sentence's first two characters as a 人物 entity; P_exp: a continuation that
    repeats the given entities in new sentences, plus a duplicate and an over-long line."""
    prompt = request.prompt_text
    if "命名实体" in prompt:
        sentence = prompt.rsplit("输入：", 1)[-1].strip()
        return json.dumps([{"entity": sentence[:2], "type": "人物"}], ensure_ascii=False)
    if "实体：" in prompt:
        entities = re.findall(r"'([^'(]+)\(", prompt.rsplit("实体：", 1)[-1])
        person, city = (entities + ["张三", "北京"])[:2]
        return (f"**续写：**{person}后来又去了{city}。\n1. **{person}**：{person}是一个人名，住在{city}。"
                f"\n{person}后来又去了{city}。\n" + "很" * 300 + "。")
    return "这是一个测试句子。"


SECRET = "sk-knowfree-test-0123456789abcdef"


def _write_configs(root: Path, base_url: str, *extra: str) -> Path:
    train = tiny_run_config(root, epochs=2, encoder_lr=1e-3, head_lr=3e-3)
    train["model"]["beta"] = BETA
    (root / "train.yaml").write_text(yaml.safe_dump(train, allow_unicode=True), encoding="utf-8")
    # The key as a mounted secret file (outside the run folder): the engines in the actors read it.
    (root / "secret").mkdir()
    (root / "secret" / "api_key").write_text(SECRET + "\n", encoding="utf-8")
    engine = {"kind": "openai", "model": "stub", "base_url": base_url, "max_retries": 0,
              "api_key_file": str(root / "secret" / "api_key")}
    pipeline = {
        "train_config": str(root / "train.yaml"),
        "output_dir": str(root / "run"),
        "variant": "FS",
        "annotate": {"annotator": "llm", "steps": ["ent"], "llm": {"engine": engine},
                     "pool": {"num_actors": 1, "cpus_per_actor": 0.5, "batch_size": 8}},
        "merge": {"proposer": "faiss", "pool": {"num_actors": 1, "cpus_per_actor": 0.5}},
        "synthesis": {"engine": engine, "synthesis": {"max_units": 60},
                      "pool": {"num_actors": 1, "cpus_per_actor": 0.5, "batch_size": 8},
                      "label": {"pool": {"num_actors": 1, "cpus_per_actor": 0.5}}},
        "train_resources": {"num_cpus": 1},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, allow_unicode=True), encoding="utf-8")
    return path


def test_variant_fs_end_to_end_against_a_loopback_openai_server(ray_cluster, llm_stub, tmp_path, capsys):
    llm_stub.answer = _stub_answer
    config_path = _write_configs(tmp_path, llm_stub.base_url)
    summary = run_pipeline(load_structured(PipelineConfig, str(config_path), []))
    run = tmp_path / "run"

    # the run folder holds every intermediate artefact
    for relative in ["train_subset.jsonl", "annotate/annotated.jsonl", "merge/label_map.json", "merge/merged.jsonl",
                     "train/model", "train/metrics.json", "synthesize/synthetic.jsonl",
                     "synthesize/labeled/labeled.jsonl", "synthesize/summary.json",
                     "synthetic_annotate/annotated.jsonl", "train_fs_data.jsonl", "train_fs/model",
                     "train_fs/metrics.json", "cell.json", "summary.md", "summary.json"]:
        assert (run / relative).exists(), relative

    synthesis = json.loads((run / "synthesize" / "summary.json").read_text(encoding="utf-8"))
    assert synthesis["sources"] == 20 and synthesis["sources_with_entities"] == 20
    # per answer: the repeated sentence and the 300-character line are dropped and counted
    assert synthesis["rejections_by_reason"]["sentence too long"] == 20
    assert synthesis["rejections_by_reason"]["duplicate sentence"] >= 20
    assert synthesis["synthetic_sentences"] > 0

    # the synthetic samples are in the FS training data, flagged, linked to their source,
    # and carry extension labels from pipeline 1; the FS run trains them with β
    fs_train = read_dataset(run / "train_fs" / "train_data.jsonl")
    synthetic = [s for s in fs_train if s.synthetic]
    originals = {s.id for s in fs_train if not s.synthetic}
    assert len(synthetic) == synthesis["synthetic_sentences"] and len(originals) == 20
    assert all(s.id.split("#syn")[0] in originals for s in synthetic)
    assert all(any(e.source == "llm:ent" for e in s.extension_spans) for s in synthetic)
    fs_config = yaml.safe_load((run / "train_fs" / "config.yaml").read_text(encoding="utf-8"))
    assert fs_config["model"]["beta"] == BETA
    assert json.loads((run / "cell.json").read_text(encoding="utf-8"))["beta"] == BETA
    # F trained on the originals only
    assert not any(s.synthetic for s in read_dataset(run / "train" / "train_data.jsonl"))

    assert set(summary["cells"][""]) == {"F", "FS"}

    # the key reached the server from every actor, and no artefact of the run holds it
    assert {r.authorization for r in llm_stub.requests} == {f"Bearer {SECRET}"}
    leaked = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    # nor does anything Ray writes for this session: driver, worker and raylet logs, runtime-env files
    context = ray_cluster.get_runtime_context()
    session = Path(context.get_temp_dir()) / context.get_session_name()
    assert any((session / "logs").glob("worker-*.out")), f"no worker logs under {session}"
    leaked = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    out = capsys.readouterr().out
    assert "| F |" in out and "| FS |" in out and "synthesis engine: openai stub" in out

    # the same command again: every stage is skipped, no prompt is sent again
    requests = len(llm_stub.requests)
    again = run_pipeline(load_structured(PipelineConfig, str(config_path), []))
    assert again["cells"][""]["FS"]["test"] == summary["cells"][""]["FS"]["test"]
    assert [r.prompt_text for r in llm_stub.requests[requests:]] == ["ping"] * (len(llm_stub.requests) - requests)


def test_a_pipeline_starts_its_local_cluster_with_the_slots_of_its_busiest_stage():
    """The demo's synthesis pool (1 actor of 1 CPU + its read task + Ray Data's checkpoint
    filter) needs 2.25 slots, more than its training's 2: a local cluster sized for training
    alone cannot grow, and the synthesis stage was refused once F was trained."""
    from jobs.rowjob import PoolConfig

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo-pipeline.yaml")
    config = load_structured(PipelineConfig, demo, [])
    assert config.cpu_slots() >= config.synthesis.pool.cpu_slots() == 2.25 > config.train_resources.num_cpus
    wide = load_structured(PipelineConfig, demo,
                           ["custom_variants={FU-wide: {self_training: true, unlabeled: {pool: {num_actors: 4}}}}"])
    assert wide.cpu_slots() == PoolConfig(num_actors=4).cpu_slots()


def test_summary_table_gives_mean_and_std_over_seeds():
    def cell(f1):
        return {"test": {"f1": f1}}

    results = {
        "k5-seed1": {"F": cell(0.30), "FS": cell(0.40)},
        "k5-seed2": {"F": cell(0.34), "FS": cell(0.42)},
        "k10-seed1": {"F": cell(0.50), "FS": cell(0.52)},
    }
    table = summary_table(results, ["F", "FS"]).splitlines()
    assert table[0] == "| setting | seeds | F test F1 | FS test F1 |"
    assert table[2] == "| k5 | 2 | 32.00 ± 2.83 | 41.00 ± 1.41 |"
    assert table[3] == "| k10 | 1 | 50.00 | 52.00 |"


def test_grid_cells_and_bad_variants_are_checked(tmp_path):
    from jobs.pipeline import grid_cells
    from knowfree_core.errors import ConfigError

    config = load_structured(PipelineConfig, None, [
        "train_config=x.yaml", f"output_dir={tmp_path}", "grid.k_shot=[5,10]", "grid.seeds=[1,2]"])
    cells = grid_cells(config)
    assert [name for name, _ in cells] == ["k5-seed1", "k5-seed2", "k10-seed1", "k10-seed2"]
    assert "data.subset_seed=2" in cells[1][1] and "data.k_shot=5" in cells[1][1]
    with pytest.raises(ConfigError, match="variant"):
        run_pipeline(load_structured(PipelineConfig, None, [
            "train_config=x.yaml", f"output_dir={tmp_path}", "variant=XYZ"]))


def test_ablation_training_files_leave_out_the_named_extension_sources(tmp_path):
    from jobs.pipeline import ABLATIONS, Cell
    from knowfree_core.config import KnowFreeConfig
    from knowfree_core.formats import write_dataset
    from knowfree_core.records import ExtensionSpan, Sentence, Span

    sentence = Sentence(id="a", units=list("张三在北京"), spans=[Span(0, 2, "PER")], extension_spans=[
        ExtensionSpan(0, 2, "ENT-PER", "lac:ent"), ExtensionSpan(0, 2, "SEG", "lac:seg"),
        ExtensionSpan(0, 2, "POS-nr", "lac:pos")])
    (tmp_path / "annotate").mkdir()
    (tmp_path / "merge").mkdir()
    write_dataset([sentence], tmp_path / "annotate" / "annotated.jsonl")
    write_dataset([sentence], tmp_path / "merge" / "merged.jsonl")
    config = load_structured(PipelineConfig, None, ["train_config=x.yaml", f"output_dir={tmp_path}"])
    cell = Cell(config, KnowFreeConfig(), tmp_path)

    def sources(variant):
        path = cell.ablation_data(variant, *ABLATIONS[variant][:2])
        return path, sorted(e.source for s in read_dataset(path) for e in s.extension_spans)

    assert sources("F-noent")[1] == ["lac:pos", "lac:seg"]
    assert sources("F-nopos")[1] == ["lac:ent", "lac:seg"]
    assert sources("F-nomerge")[0] == tmp_path / "annotate" / "annotated.jsonl"
    assert sources("F-cnn")[0] == tmp_path / "merge" / "merged.jsonl"
    assert ABLATIONS["F-cnn"][2] == {"grid_mixer": "cnn"}


def test_splits_read_with_reader_options_get_jsonl_copies_for_training(tmp_path):
    """A CoNLL-U POS dataset (read_options task=pos): the cell trains on its own JSONL, so dev
    and test are copied to JSONL too and every split is read with one format."""
    from jobs.pipeline import Cell
    from knowfree_core.config import load_config

    fixtures = Path(__file__).parent / "fixtures"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "data": {"train": str(fixtures / "tiny.conllu"), "dev": str(fixtures / "tiny.conllu"),
                 "test": str(fixtures / "tiny.conllu"), "format": "conllu", "read_options": {"task": "pos"}}}))
    config = load_structured(PipelineConfig, None, [f"train_config={tmp_path / 'train.yaml'}", f"output_dir={tmp_path}"])
    cell = Cell(config, load_config(tmp_path / "train.yaml"), tmp_path)
    copies = cell._jsonl_eval_splits(cell.train_config)
    assert copies["format"] is None and copies["read_options"] == {}
    expected = read_dataset(fixtures / "tiny.conllu", format="conllu", task="pos")
    assert [s.spans for s in read_dataset(copies["dev"])] == [s.spans for s in expected]
    assert cell._jsonl_eval_splits(load_config(None, [f"data.train={fixtures / 'tiny.jsonl'}"])) == {}


def test_custom_variants_train_f_or_the_plain_subset_with_their_overrides(tmp_path):
    from jobs.pipeline import Cell, check_variants, train_dir
    from knowfree_core.config import KnowFreeConfig
    from knowfree_core.errors import ConfigError
    from knowfree_core.formats import write_dataset
    from model_fixtures import tiny_corpus

    config = load_structured(PipelineConfig, None, [
        "train_config=x.yaml", f"output_dir={tmp_path}",
        "custom_variants={F-view: {train_overrides: [model.alpha_scheme=view, model.view_weights.pos=0]},"
        " noext-long: {extension_labels: false, train_overrides: [train.epochs=40]}}"])
    check_variants(["F", "F-view", "noext-long"], config.custom_variants)
    with pytest.raises(ConfigError, match="F-typo"):
        check_variants(["F-typo"], config.custom_variants)
    with pytest.raises(ConfigError, match="built-in"):
        check_variants(["F"], {"noext": config.custom_variants["F-view"]})
    with pytest.raises(ConfigError, match="plain name"):
        check_variants(["../x"], {"../x": config.custom_variants["F-view"]})

    (tmp_path / "merge").mkdir()
    (tmp_path / "merge" / "summary.json").write_text("{}", encoding="utf-8")
    write_dataset(tiny_corpus(6, seed=1), tmp_path / "merge" / "merged.jsonl")
    write_dataset(tiny_corpus(6, seed=1), tmp_path / "train_subset.jsonl")
    finals = {}

    def trainer(variant, final):
        finals[variant] = final
        return {"test": {"f1": 0.5}, "dev": None, "best_epoch": 1, "train_sentences": 6}

    cell = Cell(config, KnowFreeConfig(), tmp_path, trainer=trainer)
    cell.fused = lambda variant=None: tmp_path / "merge" / "merged.jsonl"  # pipeline 1 is not under test here
    scores = cell.run(["F-view", "noext-long"])
    assert set(scores) == {"F-view", "noext-long"}
    view = finals["F-view"]
    assert view.model.alpha_scheme == "view" and view.model.view_weights["pos"] == 0.0
    assert view.model.use_extension_labels and view.data.train == str(tmp_path / "merge" / "merged.jsonl")
    assert view.output_dir == str(tmp_path / "train_f_view") == str(tmp_path / train_dir("F-view"))
    long = finals["noext-long"]
    assert long.train.epochs == 40 and not long.model.use_extension_labels
    assert long.data.train == str(tmp_path / "train_subset.jsonl")


def test_a_missing_unlabelled_pool_is_refused_before_f_is_trained(tmp_path):
    """A self-training variant whose pool is not there stops the cell at once, naming the
    variant and the path -- not after F's training, when the pool is labelled."""
    from jobs.pipeline import Cell
    from knowfree_core.config import KnowFreeConfig
    from knowfree_core.errors import ConfigError

    missing = tmp_path / "no-such-pool.txt"
    config = load_structured(PipelineConfig, None, [
        "train_config=x.yaml", f"output_dir={tmp_path}",
        f"custom_variants={{FU-news: {{self_training: true, unlabeled: {{input: [{missing}]}}}}}}"])
    trained = []
    cell = Cell(config, KnowFreeConfig(), tmp_path / "cell", trainer=lambda variant, final: trained.append(variant))
    with pytest.raises(ConfigError, match="variant FU needs unlabeled.input"):
        cell.run(["F", "FU"])
    with pytest.raises(ConfigError, match=f"variant FU-news: unlabeled.input {missing} does not exist"):
        cell.run(["F", "FU-news"])
    assert trained == [] and not (tmp_path / "cell").exists()


def test_a_custom_variant_with_its_own_annotation_gets_its_own_folders(tmp_path):
    from jobs.pipeline import Cell
    from knowfree_core.config import KnowFreeConfig
    from knowfree_core.formats import write_dataset
    from model_fixtures import tiny_corpus

    config = load_structured(PipelineConfig, None, [
        "train_config=x.yaml", f"output_dir={tmp_path}", "merge_labels=false",
        "annotate={annotator: lac, pool: {num_actors: 1}}",
        "custom_variants={F-jieba: {annotate: {annotator: jieba}}, F-view: {train_overrides: [model.alpha_scheme=view]}}"])
    write_dataset(tiny_corpus(6, seed=1), tmp_path / "train_subset.jsonl")
    annotations = []

    def annotate(source, out, settings=None):  # records what jobs.annotate would be asked
        out.mkdir(exist_ok=True)
        write_dataset(tiny_corpus(6, seed=1), out / "annotated.jsonl")
        annotations.append((out.name, (settings or config.annotate).annotator))
        return out / "annotated.jsonl"

    finals = {}
    cell = Cell(config, KnowFreeConfig(), tmp_path,
                trainer=lambda variant, final: (finals.setdefault(variant, final), {"train_sentences": 6})[1])
    cell.annotate = annotate
    cell.run(["F", "F-jieba", "F-view"])
    assert annotations == [("annotate", "lac"), ("annotate_f_jieba", "jieba"), ("annotate", "lac")]
    assert finals["F-jieba"].data.train == str(tmp_path / "annotate_f_jieba" / "annotated.jsonl")
    assert finals["F-view"].data.train == finals["F"].data.train == str(tmp_path / "annotate" / "annotated.jsonl")
    # The pool settings of the cell's annotation are kept under the variant's own annotator.
    assert config.custom_variants["F-jieba"].annotation(config.annotate).pool.num_actors == 1


def test_variant_fu_self_trains_on_an_unlabelled_pool_in_two_rounds(ray_cluster, tmp_path, capsys):
    """FU end to end on tiny files: F labels the pool (the training file itself, whose gold
    sentences are left out, plus 30 new sentences) through jobs.predict, the rule keeps the
    confident ones, jieba adds their extension labels, and FU trains on gold + pseudo samples
    with beta_unlabeled; round 2 labels the pool with FU's model. A rerun redoes nothing."""
    from knowfree_core.formats import write_dataset
    from model_fixtures import tiny_corpus

    train = tiny_run_config(tmp_path, epochs=2, encoder_lr=1e-3, head_lr=3e-3, threshold_candidates=[0.02])
    train["model"]["beta_unlabeled"] = 0.3
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train, allow_unicode=True), encoding="utf-8")
    write_dataset(tiny_corpus(30, seed=9, prefix="u", with_extensions=False), tmp_path / "pool.jsonl")
    small_pool = {"num_actors": 1, "cpus_per_actor": 0.5, "batch_size": 16}
    pipeline = {
        "train_config": str(tmp_path / "train.yaml"), "output_dir": str(tmp_path / "run"), "variant": "FU",
        "annotate": {"annotator": "jieba", "steps": ["seg"], "pool": small_pool},
        "merge_labels": False,
        "unlabeled": {"input": [str(tmp_path / "train.jsonl"), str(tmp_path / "pool.jsonl")],
                      "rule": {"min_score": 0.0, "empty_ratio": 1.0}, "rounds": 2, "pool": small_pool},
        "train_resources": {"num_cpus": 1},
        # a custom self-training variant: the same pool (its predictions are shared), another
        # rule (its own pseudo file) and weight, one round
        "custom_variants": {"FU-half": {"self_training": True, "train_overrides": ["model.beta_unlabeled=0.5"],
                                        "unlabeled": {"rounds": 1, "rule": {"min_score": 0.0, "empty_ratio": 0.0}}},
                           # partial annotation: the pool labelled again down to the doubt score
                           "FU-partial": {"self_training": True,
                                          "unlabeled": {"rounds": 1, "rule": {"min_score": 0.3, "doubt_score": 0.001,
                                                                              "empty_ratio": 1.0}}}},
        "grid": {"variants": ["FU", "FU-half", "FU-partial"]},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, allow_unicode=True), encoding="utf-8")
    summary = run_pipeline(load_structured(PipelineConfig, str(tmp_path / "pipeline.yaml"), []))
    run = tmp_path / "run"
    for relative in ["train/model", "predict_unlabeled/predictions.jsonl", "pseudo.jsonl",
                     "pseudo_annotate/annotated.jsonl", "train_fu/model", "predict_unlabeled_fu_r2/predictions.jsonl",
                     "pseudo_fu_r2.jsonl", "train_fu_r2/model", "pseudo_fu_half.jsonl", "train_fu_half/model",
                     "cell.json"]:
        assert (run / relative).exists(), relative

    cell = json.loads((run / "cell.json").read_text(encoding="utf-8"))
    selection = cell["stages"]["pseudo"]
    assert selection["predicted"] == 50 and selection["excluded_gold"] >= 20  # the gold subset is left out
    fu_train = read_dataset(run / "train_fu" / "train_data.jsonl")
    pseudo = [s for s in fu_train if s.pseudo_labeled]
    gold = [s for s in fu_train if not s.pseudo_labeled]
    assert len(gold) == 20 and len(pseudo) == selection["kept"] > 0
    assert all(s.id.endswith("#pseudo") for s in pseudo)
    assert any(s.spans for s in pseudo)  # the model's labels are the pseudo samples' targets
    assert all(any(e.source == "jieba:seg" for e in s.extension_spans) for s in pseudo)
    fu_config = yaml.safe_load((run / "train_fu" / "config.yaml").read_text(encoding="utf-8"))
    assert fu_config["model"]["beta_unlabeled"] == 0.3
    # round 2 labelled the pool with round 1's model; the cell's FU score is the last round's
    r2 = json.loads((run / "predict_unlabeled_fu_r2" / "summary.json").read_text(encoding="utf-8"))
    assert r2["model"] == str(run / "train_fu" / "model")
    last = json.loads((run / "train_fu_r2" / "metrics.json").read_text(encoding="utf-8"))
    assert summary["cells"][""]["FU"]["test"] == last["test"]
    assert "| FU |" in capsys.readouterr().out
    # FU-half: F's predictions of the same pool reused, its own rule (no empty sentences) and weight
    assert not (run / "predict_unlabeled_fu_half").exists()
    half = read_dataset(run / "pseudo_fu_half.jsonl")
    assert half and all(s.spans for s in half) and len(half) == cell["stages"]["pseudo"]["confident"]
    half_config = yaml.safe_load((run / "train_fu_half" / "config.yaml").read_text(encoding="utf-8"))
    assert half_config["model"]["beta_unlabeled"] == 0.5
    assert not (run / "train_fu_half_r2").exists()
    # FU-partial: its own predictions (a lower threshold), doubtful spans kept as uncertain_spans
    # through annotation into the training file, and never as targets
    partial_predictions = json.loads((run / "predict_unlabeled_fu_partial" / "summary.json").read_text(encoding="utf-8"))
    assert partial_predictions["settings"]["threshold"] == 0.001
    partial = [s for s in read_dataset(run / "train_fu_partial" / "train_data.jsonl") if s.pseudo_labeled]
    assert partial and any(s.uncertain_spans for s in partial)
    assert all(not set(s.uncertain_spans) & set(s.spans) for s in partial)
    assert cell["stages"]["pseudo_fu_partial"]["uncertain_spans"] > 0

    again = run_pipeline(load_structured(PipelineConfig, str(tmp_path / "pipeline.yaml"), []))
    assert again["cells"][""]["FU"]["test"] == summary["cells"][""]["FU"]["test"]
    assert again["cells"][""]["FU-half"]["test"] == summary["cells"][""]["FU-half"]["test"]
    predicted = json.loads((run / "predict_unlabeled" / "summary.json").read_text(encoding="utf-8"))
    assert predicted["written_this_run"] == 0
