import pytest

from opd.infra.io import DataFileError, read_jsonl


def test_missing_file_named(tmp_path):
    with pytest.raises(DataFileError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_malformed_line_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a"}\n{"question": \n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_missing_key_and_wrong_shape(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a"}\n')
    with pytest.raises(DataFileError, match=r"d.jsonl:1: missing key\(s\) solution"):
        read_jsonl(path, required=("question", "solution"))
    path.write_text("[1, 2]\n")
    with pytest.raises(DataFileError, match="expected a JSON object"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(DataFileError, match="empty"):
        read_jsonl(path)
