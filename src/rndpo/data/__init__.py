"""Data: readers (image/mask folders, nnU-Net v2 raw), the synthetic data set, preprocessing to
training size and grouped splits.

```python
from rndpo.data import load_dataset, make_splits
dataset = load_dataset(DataConfig(path="../shared/data/busbra", size=128))
splits = make_splits(dataset, SplitConfig(labeled=0.1))
labeled = dataset.select(splits.labeled)
```
"""

from rndpo.data.dataset import SegDataset
from rndpo.data.preprocess import NORMALISATION, to_training_size, zscore
from rndpo.data.readers import detect_format, load_dataset, read_image, read_mask
from rndpo.data.splits import Splits, dataset_groups, make_splits
from rndpo.data.synthetic import make_synthetic

__all__ = [
    "SegDataset",
    "load_dataset",
    "make_synthetic",
    "make_splits",
    "Splits",
    "dataset_groups",
    "detect_format",
    "read_image",
    "read_mask",
    "to_training_size",
    "zscore",
    "NORMALISATION",
]
