"""The shipped default student: the exact file is the quantisation of the shipped float file,
rebuilt bit for bit by the documented command (src/exfilguard/data/default_student/README.md)."""

import hashlib
import json
from pathlib import Path

import numpy as np

from exfilguard.models.exact_student import DEFAULT_EXACT_STUDENT, quantize_student

FLOAT = DEFAULT_EXACT_STUDENT.parent / "student.npz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_exact_default_records_the_shipped_float_student_as_its_source() -> None:
    with np.load(DEFAULT_EXACT_STUDENT) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert meta["source"] == {"path": "student.npz", "sha256": _sha256(FLOAT)}


def test_quantising_the_shipped_float_student_rebuilds_the_shipped_exact_file(tmp_path: Path) -> None:
    src = tmp_path / "student.npz"  # the same name as the shipped file: the meta records it
    src.write_bytes(FLOAT.read_bytes())
    out = tmp_path / "student_exact.npz"
    quantize_student(src, out)
    assert _sha256(out) == _sha256(DEFAULT_EXACT_STUDENT)


def test_the_readme_names_the_shipped_files_sha256() -> None:
    readme = (DEFAULT_EXACT_STUDENT.parent / "README.md").read_text()
    assert _sha256(FLOAT) in readme and _sha256(DEFAULT_EXACT_STUDENT) in readme
