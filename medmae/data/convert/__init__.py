"""Volumes (NIfTI, FreeSurfer MGZ, NRRD, MHA, DICOM series and Siemens mosaics, 2D images from a CSV) → WebDataset
tar shards or a Zarr v3 group, in a folder or an object store.

``convert`` is what ``tools/to_wds.py`` runs; ``verify`` re-reads a converted dataset against its manifest.
"""

from medmae.data.convert.manifest import read_manifest, verify
from medmae.data.convert.options import ConvertOptions, SampleError
from medmae.data.convert.run import ConvertResult, convert

__all__ = ["ConvertOptions", "ConvertResult", "SampleError", "convert", "read_manifest", "verify"]
