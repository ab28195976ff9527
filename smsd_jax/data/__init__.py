"""Data: sources (Fashion-MNIST, MedMNIST .npz, PNG/JPEG/DICOM folders, TFDS; single- or
multi-label; segmentation masks from PNG folders or NIfTI atlases), site partitions, and grain
pipelines for sites and downstream training."""

from smsd_jax.data import checks
from smsd_jax.data.augment import Augment
from smsd_jax.data.augment import SiteSamples
from smsd_jax.data.augment import ToFloat
from smsd_jax.data.augment import augment_from_config
from smsd_jax.data.masks import SegmentationSource
from smsd_jax.data.masks import is_segmentation
from smsd_jax.data.masks import mask_folder
from smsd_jax.data.masks import nifti_slices
from smsd_jax.data.partition import check_kind
from smsd_jax.data.partition import dirichlet_partition
from smsd_jax.data.partition import iid_partition
from smsd_jax.data.partition import label_histogram
from smsd_jax.data.partition import label_partition
from smsd_jax.data.partition import load_partition
from smsd_jax.data.partition import partition
from smsd_jax.data.partition import save_partition
from smsd_jax.data.partition import split_sites
from smsd_jax.data.partition import subset_size
from smsd_jax.data.pipelines import labelled_dataset
from smsd_jax.data.pipelines import site_dataset
from smsd_jax.data.registry import SOURCES
from smsd_jax.data.registry import load_source
from smsd_jax.data.sources import ArraySource
from smsd_jax.data.sources import ImageFolderSource
from smsd_jax.data.sources import MultiLabelSource
from smsd_jax.data.sources import Source
from smsd_jax.data.sources import TfdsSource
from smsd_jax.data.sources import fashion_mnist
from smsd_jax.data.sources import image_folder
from smsd_jax.data.sources import is_multilabel
from smsd_jax.data.sources import load_image
from smsd_jax.data.sources import medmnist_npz
from smsd_jax.data.sources import multilabel_image_folder
from smsd_jax.data.sources import tfds_source
