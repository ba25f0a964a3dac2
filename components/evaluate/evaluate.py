"""Evaluate a trained pipeline: held-out flow-matching loss, generation for the benchmark suites
in the official layouts, and the compositional scorer on the synthetic suite. Scorers that need
weights we do not have (CLIP score, the official GenEval / DPG / T2I-CompBench scorers) are
reported as not run, never with a made-up number.

Held-out data (issue #12): given the tier step's held-out manifest, ``val_loss`` is the loss on
those images (disjoint from training by id), computed by the same function and settings as each
training stage's ``val_loss`` (:func:`components.train.validation.heldout_val_loss`); without one it
falls back to freshly rendered synthetic scenes. The synthetic compositional suite always renders
scenes of the held-out split (:func:`data_tools.synthetic.is_heldout`, by the scene's groups): the
sample data never draws them, so no prompt of the suite is a training caption.

Grid panels (issue #13): on ``panels`` held-out scenes, the model generates the canny edge map and
the segmentation mask of a known image panel (:mod:`components.evaluate.panels`), scored against
the exact maps: ``panel_canny_f1`` and ``panel_mask_iou``; given ``baseline`` (the model before the
unified phase), the same for it as ``panel_canny_f1_before`` / ``panel_mask_iou_before``."""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from components.clip import ClipScorer
from components.evaluate.compositional import CATEGORIES, score_image
from components.evaluate.layouts import save_item
from components.evaluate.panels import PANEL_DIR, merge_records, panel_scores
from components.evaluate.report import write_report
from components.evaluate.suites import SUITES, PromptItem, load_suite, synthetic_suite
from model.flow import validation_loss
from model.prompts import DOMAIN_TEMPLATES, SystemPrompt, apply_system_prompt
from model.sampler import LuminaSampler, SamplerConfig
from model.text import encode_prompts
from model.vae import encode_images

log = logging.getLogger(__name__)
NO_CLIP = "not run: no CLIP weights given (clip_model)"
NOT_RUN = {
    "geneval_official": "not run: needs the official GenEval detector (mmdet Mask2Former) weights; "
    "images are written in its layout under geneval/",
    "dpg_official": "not run: needs the mPLUG-large VQA weights; 2x2 grids are written under dpg/",
    "t2i_compbench_official": "not run: needs BLIP-VQA / UniDet weights; images under t2i-compbench/",
}


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suites: list[str] = list(SUITES)
    suite_size: int | None = Field(2, ge=1, description="prompts per category per suite (None: all)")
    synthetic_size: int = Field(
        64, ge=1, description="held-out synthetic prompts the compositional scores average over"
    )
    images_per_prompt: int = Field(1, ge=1, le=4, description="GenEval / T2I-CompBench samples per prompt")
    heldout: int = Field(
        32, ge=1, description="held-out images (manifest) or synthetic scenes for the validation loss"
    )
    height: int = 128
    width: int = 128
    seed: int = 0
    clip_model: str | None = Field(None, description="CLIP hub id or folder: enables the CLIP score")
    panels: int = Field(
        4,
        ge=0,
        description="held-out synthetic scenes for the grid-panel metrics (canny edge F1, mask IoU; "
        "grids of height x height/2); 0 = off",
    )
    sampler: SamplerConfig = SamplerConfig(steps=20, system_prompt=SystemPrompt.B)
    batch: int = Field(
        8, ge=1, description="images generated at once (each prompt keeps its own seed's noise)"
    )
    synthetic_system_prompt: SystemPrompt = Field(
        DOMAIN_TEMPLATES["synthetic"],
        description="system prompt of the synthetic suite and its held-out loss: the template the"
        " synthetic scenes are trained with (the benchmark suites use the sampler's)",
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    not_run: dict[str, str]
    metrics_path: Path
    report_path: Path
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    panels: list[dict[str, Any]] = field(default_factory=list)  # per scene, before / after


def heldout_loss(
    sampler: LuminaSampler,
    n: int,
    size: int,
    seed: int = 0,
    manifest: str | Path | None = None,
    template: SystemPrompt = DOMAIN_TEMPLATES["synthetic"],
) -> float:
    """Flow-matching loss at fixed times and noise on the first ``n`` images of the held-out
    ``manifest`` (as the stages compute it, at ``size``'s buckets), or without one on ``n`` fresh
    synthetic scenes of the held-out split, their prompts under ``template``."""
    if manifest is not None:
        from components.train.validation import heldout_val_loss

        loss, _ = heldout_val_loss(
            manifest, transformer=sampler.transformer, vae=sampler.vae, tokenizer=sampler.tokenizer,
            text_encoder=sampler.text_encoder, resolution=size, limit=n, seed=seed,
        )  # fmt: skip
        return loss
    from data_tools.synthetic import render_scene

    items = synthetic_suite(n, size)
    images = [render_scene(item.metadata["objects"], size) for item in items]
    texts = [apply_system_prompt(item.prompt, template) for item in items]
    with torch.no_grad():
        latents = encode_images(sampler.vae, images)
        emb = encode_prompts(texts, sampler.tokenizer, sampler.text_encoder)

        def velocity(x, t, c, m):
            return sampler.transformer(x, t, c, m).sample

        return validation_loss(velocity, latents, emb.embeds, emb.mask, seed=seed)


def generate_suite(
    sampler: LuminaSampler,
    items: list[PromptItem],
    out: Path,
    cfg: EvalConfig,
    progress: bool,
    clip: ClipScorer | None = None,
) -> list[dict[str, Any]]:
    """Generate and save every prompt's images; synthetic items are scored as well. Up to
    ``cfg.batch`` images go through the sampler at once; each prompt keeps the noise of its own seed
    (``cfg.seed + index``), so its images do not depend on the batching."""
    synthetic = cfg.sampler.model_copy(update={"system_prompt": cfg.synthetic_system_prompt})
    counts = [4 if item.suite == "dpg" else cfg.images_per_prompt for item in items]
    chunks: list[list[int]] = []
    for i, n in enumerate(counts):
        if chunks and sum(counts[j] for j in chunks[-1]) + n <= cfg.batch:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    records = []
    label = f"eval {items[0].suite if items else ''}"
    with tqdm(total=len(items), desc=label, disable=not progress, leave=False) as bar:
        for chunk in chunks:
            prompts = [items[i].prompt for i in chunk for _ in range(counts[i])]
            seeds = [(counts[i], cfg.seed + items[i].index) for i in chunk]
            noise = torch.cat([sampler.initial_noise(n, cfg.height, cfg.width, seed) for n, seed in seeds])
            config = synthetic if items[chunk[0]].suite == "synthetic" else cfg.sampler
            images = sampler.generate(
                prompts, height=cfg.height, width=cfg.width, config=config, noise=noise
            ).images
            for i in chunk:
                item, own = items[i], images[: counts[i]]
                images = images[counts[i] :]
                records.append(item_record(item, save_item(out, item, own), own, out, clip))
            bar.update(len(chunk))
    return records


def suite_scores(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each compositional category's (and ``overall``'s) mean over scored records."""
    return {c: float(np.mean([r["scores"][c] for r in records])) for c in (*CATEGORIES, "overall")}


def item_record(
    item: PromptItem, paths: list[Path], images: list, out: Path, clip: ClipScorer | None
) -> dict[str, Any]:
    """The report record of one prompt: its images (relative paths), scores and CLIP score."""
    record: dict[str, Any] = {
        "index": item.index,
        "prompt": item.prompt,
        "category": item.category,
        "images": [str(p.relative_to(out)) for p in paths],
    }
    if item.suite == "synthetic":
        record["scores"] = score_image(images[0], [tuple(g) for g in item.metadata["groups"]])
    if clip is not None:
        record["clip_score"] = float(np.mean(clip.clip_score(images, [item.prompt] * len(images))))
    return record


def run_evaluation(
    model_dir: str | Path,
    out_dir: str | Path,
    config: EvalConfig | None = None,
    progress: bool = True,
    heldout: str | Path | None = None,
    baseline: str | Path | None = None,
) -> EvalResult:
    """Evaluate the diffusers pipeline in ``model_dir``; writes ``metrics.json``, ``report.html``
    and the generated images under ``out_dir``. ``heldout``: the held-out manifest (or tier
    folder) ``val_loss`` is computed on (else fresh synthetic scenes). ``baseline``: a diffusers
    folder of the model before the unified phase; with ``config.panels > 0`` its grid-panel
    metrics are added with the suffix ``_before`` (loaded after the evaluated model is freed)."""
    cfg = config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sampler = LuminaSampler.load(model_dir)
    clip = ClipScorer(cfg.clip_model) if cfg.clip_model else None
    not_run = dict(NOT_RUN) if clip else {"clip_score": NO_CLIP, **NOT_RUN}
    metrics: dict[str, float] = {
        "val_loss": heldout_loss(
            sampler, cfg.heldout, cfg.height, manifest=heldout, template=cfg.synthetic_system_prompt
        )
    }
    samples: dict[str, list[dict[str, Any]]] = {}
    for suite in cfg.suites:
        limit = cfg.synthetic_size if suite == "synthetic" else cfg.suite_size
        items = load_suite(suite, limit, size=cfg.height)
        samples[suite] = generate_suite(sampler, items, out, cfg, progress, clip)
        key = suite.replace("-", "_")
        metrics[f"generated_{key}"] = float(len(samples[suite]))
        if clip is not None and samples[suite]:
            metrics[f"clip_score_{key}"] = float(np.mean([r["clip_score"] for r in samples[suite]]))
    if samples.get("synthetic"):
        metrics.update({f"synthetic_{k}": v for k, v in suite_scores(samples["synthetic"]).items()})
    panels: list[dict[str, Any]] = []
    if cfg.panels > 0:
        after = panel_scores(sampler, cfg, cfg.panels, out_dir=out, label="after", progress=progress)
        metrics.update(after.metrics)
        del sampler
        _free()
        before = None
        if baseline is not None:
            before_sampler = LuminaSampler.load(baseline)
            before = panel_scores(
                before_sampler, cfg, cfg.panels, out_dir=out, label="before", progress=progress
            )
            del before_sampler
            _free()
            metrics.update({f"{k}_before": v for k, v in before.metrics.items()})
        panels = merge_records(after.records, before.records if before else None)
        (out / PANEL_DIR / "panels.json").write_text(json.dumps(panels, indent=2, ensure_ascii=False))
    elif baseline is not None:
        log.info("baseline %s not evaluated: the grid-panel metrics are off (panels = 0)", baseline)
    metrics_path = out / "metrics.json"
    payload = {
        "metrics": metrics,
        "not_run": not_run,
        "config": json.loads(cfg.model_dump_json()),
        "model": str(model_dir),
        "baseline": str(baseline) if baseline is not None else None,
    }
    metrics_path.write_text(json.dumps(payload, indent=2))
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    report = write_report(out / "report.html", metrics, not_run, samples, str(model_dir), panels=panels)
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return EvalResult(metrics, not_run, metrics_path, report, samples, panels)


def _free() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_evaluation(
    result: EvalResult,
    out_dir: Path,
    tracking_uri: str,
    run_name: str = "evaluate",
    tags: dict[str, str] | None = None,
) -> str:
    """Log metrics and the report folder to MLflow (experiment ``lumina-eval``); returns the run id."""
    from components.tracking import client_run

    run_tags = {**(tags or {}), **{f"not_run.{k}": v[:250] for k, v in result.not_run.items()}}
    with client_run(tracking_uri, "lumina-eval", run_name, run_tags) as run:
        for key, value in result.metrics.items():
            run.client.log_metric(run.run_id, key, float(value))
        run.client.log_artifacts(run.run_id, str(out_dir), artifact_path="evaluation")
    return run.run_id
