"""Two pretrainings of one `wsilocal bench pretrain` cohort, compared on the same held-out tiles, paired.

    python scripts/pretrain_compare.py COHORT_FOLDER WEIGHTS_A WEIGHTS_B

Both weight files go through the benchmark's own probes (linear probe with its L2 chosen on the val slides' tiles,
k-NN with k = 20) on the test slides' labelled tiles; the interval of B − A is a bootstrap over test *slides*, the
same slides for both (`wsilocal.bench.pretrain.slide_bootstrap`). Nothing is chosen from the test tiles.
"""

import sys
from pathlib import Path

from wsilocal.bench.pretrain import FULL, labelled_tiles, probe_scores, slide_bootstrap, tile_features_of, tile_slides

cohort, weights = Path(sys.argv[1]), {"A": sys.argv[2], "B": sys.argv[3]}
settings = FULL
tiles = labelled_tiles(cohort, mpp=settings.cohort.mpp, tile=settings.probe_tile,
                       lesion_share=settings.lesion_share, max_other_per_slide=settings.max_other_per_slide)
predicted, labels = {}, None
for name, path in weights.items():
    scores = probe_scores(tiles, tile_features_of(tiles, path, mpp=settings.cohort.mpp, tile=settings.probe_tile))
    labels = scores["labels"]
    for probe, values in scores["predicted"].items():
        predicted.setdefault(probe, {})[name] = values
    print(f"{name} ({path}): linear {scores['linear_balanced_accuracy']:.3f}, "
          f"k-NN {scores['knn_balanced_accuracy']:.3f}")
slides = tile_slides(tiles, "test")
for probe, pair in predicted.items():
    interval = slide_bootstrap(pair, labels, slides, len(tiles.classes))["B - A"]
    print(f"{probe}: B - A 95 % interval [{interval[0]:+.3f}, {interval[1]:+.3f}] "
          f"({int(slides.max()) + 1} test slides)")
