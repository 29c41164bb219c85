"""Write DICOM series from arrays with known geometry, for the DICOM tests (pydicom only, no network)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_affine(spacing: tuple[float, float, float] = (0.8, 1.1, 2.5), degrees: float = 20.0,
                   origin: tuple[float, float, float] = (-40.0, 25.0, 10.0)) -> np.ndarray:
    """A RAS affine rotated about two axes, with non-unit spacing: a grid no axis-aligned code gets right."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _ds(values: object) -> list[object]:
    """Decimal strings of at most 16 characters, as the standard (and a scanner) writes them."""
    from pydicom.valuerep import DS

    return [DS(float(v), auto_format=True) for v in values]  # type: ignore[attr-defined]


def _dataset(sop_class: str, modality: str, study: str, series: str, frame_of_reference: str) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PID-SECRET-0001", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.Manufacturer = modality, 3, "segq-tests"
    ds.PositionReferenceIndicator, ds.PatientPosition, ds.Laterality, ds.AcquisitionNumber = "", "HFS", "", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if modality == "CT":
        ds.KVP, ds.RescaleType = 120, "HU"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 10, 500, 1
    return ds


def write_series(directory: Path, data: np.ndarray, affine_ras: np.ndarray, *, modality: str = "CT",
                 slope: float = 0.5, intercept: float = -1024.0, shuffle: bool = True, seed: int = 0,
                 series_uid: str | None = None, study_uid: str | None = None, names: str = "{k:04d}.dcm",
                 skip: tuple[int, ...] = (), duplicate: tuple[int, ...] = ()) -> list[Path]:
    """``data[x, y, z]`` (NIfTI order, RAS affine) as single-frame slices: slice z's pixel (row y, column x).

    Stored values are ``(data - intercept) / slope`` rounded to int16, so the rescaled series equals
    ``data`` where it is a multiple of ``slope``. Files are written in shuffled order under plain names.
    """
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    lps = LPS_FROM_RAS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine, column_cosine = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study, series = study_uid or generate_uid(), series_uid or generate_uid()
    frame_of_reference = generate_uid(entropy_srcs=[series, "for"])
    stored = np.round((data - intercept) / slope).astype(np.int16)
    order = [k for k in range(data.shape[2]) if k not in skip] + list(duplicate)
    if shuffle:
        random.Random(seed).shuffle(order)
    paths = []
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    for number, k in enumerate(order):
        ds = _dataset(sop_class, modality, study, series, frame_of_reference)
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = _ds((lps @ [0, 0, k, 1])[:3])
        ds.ImageOrientationPatient = _ds((*row_cosine, *column_cosine))
        ds.PixelSpacing = _ds((spacing[1], spacing[0]))  # row spacing (between rows), column spacing
        ds.SliceThickness = _ds((spacing[2],))[0]
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = directory / names.format(k=number)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(path: Path, slices: list[Path]) -> Path:
    """The single-frame series as one legacy-converted enhanced CT (multi-frame) object, by highdicom."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(p) for p in slices]
    image = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 4, generate_uid(), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path)
    return path


def write_undecodable(path: Path, source: Path) -> Path:
    """``source`` re-labelled as MPEG-2 video with its pixels encapsulated: a transfer syntax nothing decodes."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML, generate_uid

    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def write_truncated(path: Path, source: Path) -> Path:
    """``source`` under a series of its own, cut short in its pixel data (a copy interrupted half-way)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(ds.PixelData) // 2])
    return path


def write_localizer(path: Path, source: Path) -> Path:
    """A slice of ``source``'s series turned to another orientation: a scout image among axial slices."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(path)
    return path
