"""DICOM series as volumes: recognised by content, grouped by SeriesInstanceUID, checked at submit, loaded
by the coordinator. No torch.

Geometry is highdicom's (``get_volume_from_series`` and ``Image.get_volume``): it sorts slices along
the slice normal, applies rescale slope and intercept, handles oblique orientations, non-unit spacing
and enhanced multi-frame objects, and refuses uneven spacing. nibabel's ``nicom`` reads one file at a
time and leaves stacking a series to the caller; highdicom also writes the SEG, so one library owns
both directions of the geometry.

The array handed to the model is in NIfTI order, (column, row, slice) with the slice axis along the
slice normal (row direction x column direction), and its affine is RAS: a series converted to NIfTI by
the usual tools gives the same voxels, so a mask lands on the same anatomy by either path.
No patient name or identifier is read into anything this module returns.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segq.errors import InputError

MAGIC_OFFSET, MAGIC = 128, b"DICM"
SEG_SUFFIX = "_seg.dcm"
NOT_IMAGES = ("SEG", "RTDOSE", "RTSTRUCT", "REG", "PR", "SR", "KO")  # modalities that are results, not scans
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_POSITION_DECIMALS = 3  # mm: positions closer than this are one position


def seg_output(output: Path) -> Path:
    """Where a job's DICOM SEG goes: beside its NIfTI mask, or the output itself when only a SEG is written."""
    return output if output.name.endswith(SEG_SUFFIX) else output.with_name(
        output.name.replace("_seg.nii.gz", SEG_SUFFIX))


def is_dicom(path: Path) -> bool:
    """True for a DICOM Part 10 file: 'DICM' after the 128-byte preamble, whatever the file is called."""
    try:
        with open(path, "rb") as handle:
            handle.seek(MAGIC_OFFSET)
            return handle.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Series:
    """One series that can become one volume: its files and what results and the report show of it."""

    uid: str
    study_uid: str
    modality: str
    files: tuple[Path, ...]
    shape: tuple[int, int, int]  # columns, rows, slices: the NIfTI order the model sees
    spacing: tuple[float, float, float]

    @property
    def directory(self) -> Path:
        """The deepest directory holding every file of the series."""
        parents = [f.parent for f in self.files]
        common = parents[0]
        while not all(p.is_relative_to(common) for p in parents):
            common = common.parent
        return common

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Refused:
    """A file or series that cannot be segmented, and why, in one line."""

    what: str
    reason: str

    def line(self) -> str:
        return f"{self.what}: {self.reason}"


def series_sha256(files: list[Path] | tuple[Path, ...]) -> str:
    """The series' content hash: sha256 over its files' sha256s, sorted (file names and order do not count)."""
    from segq.modelspec import file_sha256

    digests = sorted(file_sha256(Path(f)) for f in files)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _decoder_missing(transfer_syntax: Any) -> str | None:
    """Why pixel data of this transfer syntax cannot be decoded here, or None when it can."""
    if not transfer_syntax.is_compressed:
        return None
    from pydicom.pixels.decoders.base import get_decoder

    name = getattr(transfer_syntax, "name", str(transfer_syntax))
    try:
        available = get_decoder(transfer_syntax).is_available
    except NotImplementedError:
        available = False
    if available:
        return None
    return (f"compressed as {name} ({transfer_syntax}) and no installed decoder handles it: "
            "install the decoders (pip install 'segq[dicom]'), or decompress the series (dcmdjpeg, gdcmconv)")


def _native_bytes(ds: Any) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8


def read_header(path: Path) -> Any:
    """The file's dataset without its pixel data, after checking that pixel data can be read; InputError if not."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise InputError("DICOM support is not installed here: pip install 'segq[dicom]'") from exc
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise InputError(f"a DICOM {sop} object holds no image: not segmented")
    if ds.get("Modality") in NOT_IMAGES:
        raise InputError(f"a DICOM {ds.Modality} object (a derived result, not an image): not segmented")
    for key in ("SeriesInstanceUID", "Rows", "Columns", "BitsAllocated"):
        if key not in ds:
            raise InputError(f"the image lacks {key}: not a usable DICOM image")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"a colour image ({ds.get('PhotometricInterpretation')}): only greyscale series are segmented")
    syntax = ds.file_meta.TransferSyntaxUID
    missing = _decoder_missing(syntax)
    if missing:
        raise InputError(missing)
    if not syntax.is_compressed and len(ds.PixelData) < _native_bytes(ds):
        raise InputError(f"the file is truncated: its pixel data holds {len(ds.PixelData):,} bytes of the "
                         f"{_native_bytes(ds):,} its header promises")
    del ds.PixelData
    return ds


def _series_name(uid: str, files: list[Path]) -> str:
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
    return f"series {uid} ({where})"


def _distinct(values: list[Any]) -> list[Any]:
    return sorted({v for v in values}, key=str)


def _spacing_problem(datasets: list[Any]) -> str:
    """Why the slice positions are not evenly spaced (highdicom decided that they are not): for the message."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    along = np.sort(np.round([float(np.dot(normal, ds.ImagePositionPatient)) for ds in datasets],
                             _POSITION_DECIMALS))
    gaps = np.diff(along)
    duplicates = along[1:][gaps == 0]
    if duplicates.size:
        return (f"duplicated slices: {duplicates.size} position(s) appear twice (first at {duplicates[0]:g} mm "
                "along the slice normal); remove the copies")
    step = float(np.median(gaps))
    wide = gaps[gaps > step * 1.5]
    if wide.size:
        missing = int(np.round(wide / step).sum() - wide.size)
        return (f"missing slices: uneven spacing, gaps of {step:g} mm and {float(wide.max()):g} mm (about "
                f"{missing} slice(s) missing); export the whole series")
    return f"uneven slice spacing (gaps from {float(gaps.min()):g} to {float(gaps.max()):g} mm)"


def _check_single_frames(datasets: list[Any]) -> str | None:
    """What stops these single-frame images from forming one volume, or None."""
    if len(datasets) == 1:
        return "a single slice, not a volume"
    sizes = _distinct([(int(ds.Rows), int(ds.Columns)) for ds in datasets])
    if len(sizes) > 1:
        return f"mixed image sizes {', '.join(f'{r}x{c}' for r, c in sizes)} in one series"
    if any("ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds for ds in datasets):
        return "images lack ImagePositionPatient or ImageOrientationPatient: no geometry to stack them by"
    orientations = _distinct([tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 3)) for ds in datasets])
    if len(orientations) > 1:
        return (f"mixed orientations: {len(orientations)} different ImageOrientationPatient values in one "
                "series (a localizer among the slices?); remove the odd images")
    from highdicom.spatial import get_series_volume_positions

    spacing, _order = get_series_volume_positions(datasets)
    if spacing is None:
        return _spacing_problem(datasets)
    return None


def _multiframe_geometry(path: Path) -> Any:
    """highdicom's volume geometry of an enhanced (multi-frame) image, or a string saying why there is none."""
    import highdicom as hd

    try:
        geometry = hd.imread(path, lazy_frame_retrieval=True).get_volume_geometry()
    except Exception as exc:  # highdicom raises ValueError, sqlite3 errors or KeyError for frames it cannot place
        return f"a multi-frame object whose frames highdicom cannot place as a volume ({type(exc).__name__}: {exc})"
    return geometry or "a multi-frame object whose frames are not a regularly spaced volume"


def _to_series(uid: str, items: list[tuple[Path, Any]]) -> Series | Refused:
    files = sorted(path for path, _ in items)
    datasets = [ds for _, ds in items]
    name = _series_name(uid, files)
    ds = datasets[0]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets):
        if len(datasets) > 1:
            return Refused(name, f"multi-frame objects among {len(datasets)} files: one volume needs one "
                                 "multi-frame object, or single frames only")
        geometry = _multiframe_geometry(files[0])
        if isinstance(geometry, str):
            return Refused(name, geometry)
        slice_step, row, column = (float(v) for v in geometry.spacing)
        spacing = (column, row, slice_step)
    else:
        problem = _check_single_frames(datasets)
        if problem:
            return Refused(name, problem)
        from highdicom.spatial import get_series_volume_positions

        step, _ = get_series_volume_positions(datasets)
        row, column = (float(v) for v in ds.PixelSpacing) if "PixelSpacing" in ds else (1.0, 1.0)
        spacing, frames = (column, row, float(step or 0.0)), len(datasets)
    return Series(uid, str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")), tuple(files),
                  (int(ds.Columns), int(ds.Rows), frames), spacing)


def find_series(files: list[Path]) -> tuple[list[Series], list[Refused]]:
    """Group DICOM files into series by SeriesInstanceUID and check each; a bad file or series is refused alone."""
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    refused: list[Refused] = []
    for path in files:
        if not is_dicom(path):
            refused.append(Refused(str(path), "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"))
            continue
        try:
            ds = read_header(path)
        except InputError as exc:
            refused.append(Refused(str(path), str(exc)))
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    found: list[Series] = []
    for uid, items in groups.items():
        result = _to_series(uid, items)
        (found if isinstance(result, Series) else refused).append(result)  # type: ignore[arg-type]
    return found, refused


def check_volume(series: Series, roi_size: int, max_voxels: int) -> str | None:
    """What stops the model from segmenting this series, or None.

    A series thinner than a quarter of the model's window (24 slices for ROI 96) would be mostly padding
    in every window.
    """
    fewest = max(2, -(-roi_size // 4))
    if series.shape[2] < fewest:
        return (f"too thin for the model: {series.shape[2]} slice(s), the model's {roi_size}-voxel window "
                f"needs at least {fewest}")
    if series.voxels > max_voxels:
        return f"{series.shape} is {series.voxels:,} voxels, above the limit of {max_voxels:,} (SEGQ_MAX_VOXELS)"
    return None


@dataclass(frozen=True)
class LoadedSeries:
    """A series as the model sees it, and the geometry the SEG writer needs to map the mask back."""

    volume: np.ndarray  # (columns, rows, slices), float32, modality rescale applied
    affine: np.ndarray  # RAS, for the NIfTI mask
    lps_affine: np.ndarray  # highdicom's (slice, row, column) -> LPS affine of the same grid, for the SEG
    frame_of_reference_uid: str | None


def read_datasets(files: list[Path], pixels: bool) -> list[Any]:
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in files]


def _order(datasets: list[Any]) -> tuple[float, list[Any]]:
    """Slice spacing and the datasets in volume order, by highdicom; InputError saying why not a volume."""
    from highdicom.spatial import get_volume_positions

    positions = [[float(v) for v in ds.ImagePositionPatient] for ds in datasets]
    spacing, indices = get_volume_positions(positions, [float(v) for v in datasets[0].ImageOrientationPatient])
    if spacing is None or indices is None:
        raise InputError(_spacing_problem(datasets))
    return spacing, [ds for _, ds in sorted(zip(indices, datasets, strict=True), key=lambda pair: pair[0])]


def _rescale_into(out: np.ndarray, ds: Any) -> None:
    """The modality transform (pydicom's) of one slice, written into ``out`` without a float64 slice between."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        out[...] = apply_modality_lut(ds.pixel_array, ds)
        return
    np.multiply(ds.pixel_array, float(ds.get("RescaleSlope", 1) or 1), out=out, casting="unsafe")
    out += float(ds.get("RescaleIntercept", 0) or 0)


def _stack_single_frames(datasets: list[Any]) -> Any:
    """The slices as a highdicom Volume: highdicom orders them and builds the geometry, pydicom decodes them.

    highdicom's own series reader checks every image against its IOD (15 ms a slice, 4.7 of 9 s for a
    300-slice CT on two cores), so only its geometry is used here. The slices are stacked straight into the
    left-handed order that becomes (column, row, slice) along the normal, so no flipped copy is needed.
    """
    import highdicom as hd

    spacing, ordered = _order(datasets)
    first = ordered[0]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=first.ImagePositionPatient, image_orientation=first.ImageOrientationPatient,
        rows=int(first.Rows), columns=int(first.Columns), pixel_spacing=first.PixelSpacing,
        spacing_between_slices=spacing, number_of_frames=len(ordered), coordinate_system="PATIENT",
        frame_of_reference_uid=first.get("FrameOfReferenceUID"))
    wanted = geometry.ensure_handedness("LEFT_HANDED", flip_axis=0)
    if not np.allclose(wanted.affine, geometry.affine):
        ordered.reverse()
    array = np.empty((len(ordered), int(first.Rows), int(first.Columns)), np.float32)
    for k, ds in enumerate(ordered):
        _rescale_into(array[k], ds)
    return wanted.with_array(array)


def load_series(files: list[Path]) -> LoadedSeries:
    """Decode the series into a volume in NIfTI order; InputError for anything highdicom cannot stack."""
    import highdicom as hd

    try:
        datasets = read_datasets(files, pixels=True)
        if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
            volume = hd.Image.from_dataset(datasets[0], copy=False).get_volume(dtype=np.float32)
        else:
            volume = _stack_single_frames(datasets)
    except InputError:
        raise
    except Exception as exc:  # pydicom and highdicom raise ValueError, RuntimeError, KeyError, AttributeError
        raise InputError(f"the series could not be read as a volume ({type(exc).__name__}: {exc})") from exc
    # (slice, row, column) left-handed in LPS is (column, row, slice) right-handed: slices run along the normal
    volume = volume.ensure_handedness("LEFT_HANDED", flip_axis=0)
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim != 3:
        raise InputError(f"the series decodes to shape {array.shape}, not one greyscale volume")
    affine = RAS_FROM_LPS @ np.asarray(volume.affine)[:, [2, 1, 0, 3]]
    # (column, row, slice) as a Fortran-ordered view, as nibabel gives a NIfTI; a flipped view is copied once
    return LoadedSeries(np.asfortranarray(array.transpose(2, 1, 0)), affine, np.asarray(volume.affine),
                        volume.frame_of_reference_uid)
