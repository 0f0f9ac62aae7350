"""Data: TFDS loading (offline from IDX files), transfer sets, augmentation, batching."""

from distill_jax.data.augment import jitter, translate
from distill_jax.data.batching import epoch_batches, eval_batches, num_batches
from distill_jax.data.tfds_loading import (
    DATA_DIR_ENV,
    IDX_FILES,
    MANUAL_DIR_ENV,
    SUPPORTED_DATASETS,
    Dataset,
    DatasetNotFoundError,
    check_prepare_dependencies,
    clear_cache,
    find_manual_dir,
    load_split,
    load_split_numpy,
    manual_dir_candidates,
    missing_prepare_dependencies,
    prepare,
    resolve_data_dir,
    shared_data_root,
)
from distill_jax.data.transfer import (
    class_counts,
    drop_classes,
    keep_classes,
    take_subset,
    train_val_split,
)

__all__ = [
    "DATA_DIR_ENV",
    "IDX_FILES",
    "MANUAL_DIR_ENV",
    "SUPPORTED_DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "check_prepare_dependencies",
    "class_counts",
    "clear_cache",
    "drop_classes",
    "epoch_batches",
    "eval_batches",
    "find_manual_dir",
    "jitter",
    "keep_classes",
    "load_split",
    "load_split_numpy",
    "manual_dir_candidates",
    "missing_prepare_dependencies",
    "num_batches",
    "prepare",
    "resolve_data_dir",
    "shared_data_root",
    "take_subset",
    "train_val_split",
    "translate",
]
