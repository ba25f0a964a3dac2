"""Multi-image grid samples for Template C fine-tuning (paper Sec. 3): condition maps of an image
(:mod:`components.grids.annotators`, or the exact ground truth of a synthetic scene:
:mod:`components.grids.ground_truth`) paired with it in dual-panel and 2x2 grids
(:mod:`components.grids.grid`)."""
