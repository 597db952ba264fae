"""engine.gguf_tensors against the `gguf` package's reader on the default model's file:
the same tensors, types and bytes; and files it cannot read refused with a message."""

import numpy as np
import pytest

from engine.gguf_tensors import GGUFError, read_tensors


def test_every_tensor_is_the_gguf_packages_own(model_dir):
    from gguf import GGUFReader

    from model_store.default_model import gguf_path

    ours, theirs = read_tensors(gguf_path()), GGUFReader(str(gguf_path())).tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.type_name == reference.tensor_type.name, mine.name
        assert mine.shape == tuple(int(d) for d in reversed(reference.shape)), mine.name
        if mine.type_name in ("Q4_0", "Q4_1", "Q8_0"):
            assert np.array_equal(mine.data, np.asarray(reference.data)), mine.name


def test_what_is_not_a_gguf_file_or_is_cut_short_is_refused(tmp_path, model_dir):
    from model_store.default_model import gguf_path

    other = tmp_path / "model.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        read_tensors(other)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path().read_bytes()[:20_000_000])
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        read_tensors(cut)
