"""The evaluation report: one self-contained HTML file (every image a ``data:`` URI, nothing linked),
written by the evaluate step (metrics, images) and, in full, by the register step (gate decision,
challenger beside champion, loss curves and sample grids per stage, lineage) from what MLflow holds;
opened in headless Chromium from a ``file://`` URL, every image decodes.

The browser is the one tests/test_serving_page.py uses (``tools/browser/chromium.py``); without
Playwright or a browser the browser test skips with the reason, unless ``LUMINA_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from PIL import Image

from components.evaluate.evaluate import EvalResult, log_evaluation
from components.evaluate.report import Decision, EvalImages, StageTrace, build_report, write_report
from components.register.register import register_model
from components.register.report import REPORT_ARTIFACT, write_registration_report

REPO = Path(__file__).resolve().parents[1]
PNG = "data:image/png;base64,"
COLOURS = {"challenger": (200, 30, 30), "champion": (30, 30, 200)}


class Refs(HTMLParser):
    """Every ``src`` / ``href`` (and any other URL-bearing attribute) and every <img> in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.imgs: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "img":
            self.imgs.append(values)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action", "xlink:href"):
                self.refs.append((tag, name, value or ""))


def parse(text: str) -> Refs:
    refs = Refs()
    refs.feed(text)
    return refs


def decoded(uri: str) -> Image.Image:
    assert uri.startswith(PNG), uri[:60]
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(PNG) :])))
    image.load()
    return image


def assert_self_contained(text: str) -> Refs:
    refs = parse(text)
    assert refs.imgs, "no images in the report"
    outside = [r for r in refs.refs if not (r[1] == "src" and r[2].startswith(PNG))]
    assert not outside, f"references outside the file: {[(t, a, v[:80]) for t, a, v in outside]}"
    assert "url(" not in text and "@import" not in text and "<link" not in text and "<script" not in text
    for img in refs.imgs:
        assert decoded(img["src"]).size[0] > 0
    return refs


def fake_evaluation(out: Path, colour: tuple[int, int, int], val_loss: float) -> dict:
    """An evaluate step's out_dir: two synthetic prompts (PNG), one dpg prompt (a JPEG: converted),
    ``samples.json`` and ``metrics.json`` as run_evaluation writes them."""
    (out / "synthetic").mkdir(parents=True, exist_ok=True)
    (out / "dpg").mkdir(exist_ok=True)
    samples = {"synthetic": [], "dpg": []}
    for index, prompt in enumerate(["a red cube", "two blue balls"]):
        rel = f"synthetic/{index:05d}_0.png"
        Image.new("RGB", (32, 32), colour).save(out / rel)
        samples["synthetic"].append({"index": index, "prompt": prompt, "category": "colour",
                                     "images": [rel], "scores": {"colour": index == 0}})  # fmt: skip
    Image.new("RGB", (64, 64), colour).save(out / "dpg/7.jpg", format="JPEG")
    samples["dpg"].append(
        {"index": 0, "prompt": "a dense scene", "category": "entity", "images": ["dpg/7.jpg"]}
    )
    metrics = {"val_loss": val_loss, "synthetic_overall": 0.5}
    (out / "samples.json").write_text(json.dumps(samples))
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "not_run": {"clip_score": "no CLIP"}}))
    return {"metrics": metrics, "samples": samples}


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (96, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_built_report_is_self_contained(tmp_path):
    ours = fake_evaluation(tmp_path / "ours", COLOURS["challenger"], 0.5)
    theirs = fake_evaluation(tmp_path / "theirs", COLOURS["champion"], 0.6)
    (tmp_path / "ours/synthetic/00001_0.png").unlink()  # a missing image: a note, not a broken link
    stages = [
        StageTrace("lowres", "r1", [(1, 1.0), (2, 0.8), (3, float("nan")), (4, 0.5)],
                   [("step 2", png_bytes((0, 128, 0))), ("end", tmp_path / "ours/synthetic/00000_0.png")]),
        StageTrace("highres", notes=["no MLflow run recorded for stage highres"]),
    ]  # fmt: skip
    text = build_report(
        "Evaluation of m v2",
        metrics=ours["metrics"],
        champion_metrics=theirs["metrics"],
        challenger=EvalImages("challenger v2", ours["samples"], tmp_path / "ours"),
        champion=EvalImages("champion v1", theirs["samples"], tmp_path / "theirs"),
        decision=Decision(
            False, ["val_loss=0.7 regresses"], ["champion has no acc"], ["challenger"], "", "1"
        ),
        stages=stages,
        lineage={"dataset hash": "abc", "git sha": ""},
        notes=["a note"],
    )
    refs = assert_self_contained(text)
    assert len(refs.imgs) == 5 + 2  # 3 challenger (one missing) + 3 champion, and 2 grids
    assert "image not readable" in text and "<svg" in text and "1 non-finite values left out" in text
    assert (
        "val_loss=0.7 regresses" in text and "champion has no acc" in text and "data-promoted='false'" in text
    )
    assert "-0.1" in text and "-16.67%" in text  # val_loss delta against the champion
    sizes = {decoded(img["src"]).size for img in refs.imgs}
    assert (64, 64) in sizes  # the JPEG, converted to PNG

    out = tmp_path / "eval"
    evaluation = fake_evaluation(out, COLOURS["challenger"], 0.5)
    report = write_report(
        out / "report.html", evaluation["metrics"], {"x": "why"}, evaluation["samples"], "m"
    )
    refs = assert_self_contained(report.read_text())
    assert len(refs.imgs) == 3 and "Evaluation of m" in report.read_text()
    (out / "synthetic").rename(tmp_path / "elsewhere")  # the file still shows its images
    assert len(parse(report.read_text()).imgs) == 3


@pytest.fixture(scope="module")
def registered(tiny_folder, tmp_path_factory):
    """Two registrations in a real sqlite MLflow store: v1 (champion) and v2 (held: regresses),
    each with its evaluate run's artifacts; v2's stage runs have losses and sample grids."""
    tmp = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    eval_runs = {}
    for side, val_loss in (("champion", 0.5), ("challenger", 0.9)):
        out = tmp / side
        fake = fake_evaluation(out, COLOURS[side], val_loss)
        result = EvalResult(fake["metrics"], {"clip_score": "no CLIP"}, out / "metrics.json", out / "r.html")
        eval_runs[side] = log_evaluation(result, out, uri)
    stages = {}
    for index, stage in enumerate(("lowres", "highres")):
        run_id = client.create_run(client.create_experiment(f"train-{stage}")).info.run_id
        for step in range(1, 9):
            client.log_metric(run_id, "loss", 1.0 / step + 0.01 * (step % 3), step=step)
        client.log_metric(run_id, "val_loss", 0.42 + index, step=8)  # the stage's held-out loss
        grids = tmp / f"grids-{stage}"
        (grids / "samples").mkdir(parents=True)
        (grids / "samples.png").write_bytes(png_bytes((0, 100 + 50 * index, 0)))
        (grids / "samples" / "samples-000004.png").write_bytes(png_bytes((0, 0, 100 + 50 * index)))
        client.log_artifact(run_id, str(grids / "samples.png"))
        client.log_artifact(run_id, str(grids / "samples" / "samples-000004.png"), "samples")
        client.set_terminated(run_id)
        stages[stage] = run_id
    lineage = {"dataset_hash": "ds123", "captions_hash": "cap456", "tiers_hash": "tier789",
               "data_version": "dvc0abc", "git_sha": "deadbeef", "source_fingerprint": "fp42"}  # fmt: skip
    first_tags = {**lineage, "run.evaluate": eval_runs["champion"]}
    first = register_model(tiny_folder, "rep", uri, {"val_loss": 0.5}, tags=first_tags)
    first_report = write_registration_report(first, first_tags, uri, tmp / "first" / "report")
    tags = {**lineage, "run.evaluate": eval_runs["challenger"], "run.lowres": stages["lowres"],
            "run.highres": stages["highres"], "run.hq": "no-such-run"}  # fmt: skip
    second = register_model(tiny_folder, "rep", uri, {"val_loss": 0.9}, tags=tags)
    report = write_registration_report(second, tags, uri, tmp / "second" / "report")
    return SimpleNamespace(uri=uri, client=client, first=first, first_report=first_report, second=second,
                           report=report, stages=stages, tmp=tmp)  # fmt: skip


def test_register_report_has_decision_both_sides_stages_and_lineage(registered):
    text = registered.report.read_text()
    refs = assert_self_contained(text)
    assert registered.second.reasons and not registered.second.promoted
    assert "data-promoted='false'" in text and "not promoted" in text
    for reason in registered.second.reasons:
        assert reason in text
    assert "champion v1" in text and "challenger v2" in text
    colours = [decoded(img["src"]).convert("RGB").getpixel((0, 0)) for img in refs.imgs]

    def count(side: str) -> int:  # the JPEG's pixels are near, not equal
        return sum(max(abs(a - b) for a, b in zip(c, COLOURS[side], strict=True)) < 12 for c in colours)

    assert count("challenger") == 3 and count("champion") == 3  # every prompt, both sides
    prompts = text.split("id='images'")[1].split("</section>")[0]
    assert prompts.count("<tr><td") == 3 and "prompt not evaluated" not in prompts
    stages = text.split("id='stages'")[1].split("</section>")[0]
    assert stages.count("<svg") == 2  # lowres and highres losses; hq's run is missing: a note
    assert "no-such-run" in stages and "EMA weights at step 4" in stages and "end of stage" in stages
    assert "val_loss 0.42" in stages and "val_loss 1.42" in stages
    for value in ("ds123", "cap456", "tier789", "dvc0abc", "deadbeef", "fp42", registered.stages["lowres"]):
        assert value in text.split("id='lineage'")[1]
    assert "0.9" in text and "+0.4" in text and "+80.00%" in text  # val_loss against the champion
    # the same file in the version's MLflow run
    names = [a.path for a in registered.client.list_artifacts(registered.second.run_id)]
    assert REPORT_ARTIFACT in names
    logged = registered.client.download_artifacts(
        registered.second.run_id, REPORT_ARTIFACT, str(registered.tmp)
    )
    assert Path(logged).read_text() == text


def test_register_report_without_champion_or_artifacts(registered):
    text = registered.first_report.read_text()
    assert_self_contained(text)
    assert "data-promoted='true'" in text and "no champion was compared against" in text
    assert "champion v" not in text.split("id='images'")[1]  # the challenger alone
    assert "no MLflow run recorded for stage lowres" in text
    # nothing to fetch at all: still a report, never a failure
    from components.register.register import Registration

    lost = Registration("rep", "1", ["champion"], True, run_id="", champion="99")
    path = write_registration_report(lost, {"run.evaluate": "gone"}, registered.uri, registered.tmp / "lost")
    lost_text = path.read_text()
    assert "Evaluation of rep v1" in lost_text and "not readable" in lost_text
    assert "evaluation artifacts of run gone not available" in lost_text


def test_register_op_writes_the_report(tiny_folder, tmp_path):
    """The component function itself: its HTML output and the artifact in the version's run."""
    from kfp import dsl

    from components.register.component import register_op

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    fake = fake_evaluation(out, COLOURS["challenger"], 0.4)
    run_id = log_evaluation(EvalResult(fake["metrics"], {}, out / "m.json", out / "r.html"), out, uri)
    report = dsl.HTML(uri=str(tmp_path / "kfp" / "report"))
    (tmp_path / "kfp").mkdir()
    answer = register_op.python_func(
        model=dsl.Model(uri=str(tiny_folder)),
        report=report,
        eval_result=json.dumps({"metrics": fake["metrics"], "run_id": run_id}),
        model_name="op",
        mlflow_tracking_uri=uri,
        dataset_hash="ds-op",
    )
    registration = json.loads(answer)
    text = Path(report.path).read_text()
    assert registration["promoted"] and "Evaluation of op v1" in text and "ds-op" in text
    assert len(assert_self_contained(text).imgs) == 3
    client = MlflowClient(tracking_uri=uri)
    assert REPORT_ARTIFACT in [a.path for a in client.list_artifacts(registration["run_id"])]


# --- headless Chromium -------------------------------------------------------------------------


def test_report_renders_in_chromium(browser, registered, tmp_path):
    """Opened from a file:// URL (as a downloaded KFP / MLflow artifact is), every image decodes;
    no request leaves the file. The screenshot is left in the test's tmp folder."""
    page_file = tmp_path / "report.html"
    page_file.write_text(registered.report.read_text())
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(page_file.as_uri(), wait_until="load")
        assert page.title() == f"Evaluation of rep v{registered.second.version}"
        sizes = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"
        )
        assert len(sizes) >= 8, sizes
        broken = [s for s in sizes if not (s[0] and s[1] > 0 and s[2] > 0)]
        assert not broken, f"images that did not load: {broken}"
        assert page.locator("svg").count() == 2 and page.locator("#decision").is_visible()
        shot = page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    finally:
        context.close()
    assert not errors, errors
    outside = [u for u in requests if not u.startswith(("data:", page_file.as_uri()))]
    assert not outside, f"requests outside the file: {outside}"
    assert (tmp_path / "report.png").stat().st_size == len(shot) > 0
    print(f"screenshot: {tmp_path / 'report.png'}")


def test_large_sets_are_bounded(tmp_path):
    """Per-prompt images are embedded as thumbnails, and a long suite shows its first prompts."""
    from components.evaluate.report import PROMPT_SIDE, prompt_images

    Image.new("RGB", (1024, 512), (9, 9, 9)).save(tmp_path / "big.png")
    records = [{"prompt": f"p{i}", "category": "c", "images": ["big.png"]} for i in range(3)]
    text = prompt_images(EvalImages("m", {"s": records}, tmp_path), limit=2)
    sizes = [decoded(img["src"]).size for img in parse(text).imgs]
    assert sizes == [(PROMPT_SIDE, PROMPT_SIDE // 2)] * 2 and "1 more prompts not shown" in text
