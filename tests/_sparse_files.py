"""A sparse model file (multiflow_kernels.save_sparse) edited as a corrupt file would be."""
from safetensors import safe_open
from safetensors.torch import save_file


def tampered_copy(path, out, edit):
    """Write to ``out`` the file at ``path`` with its tensors changed by ``edit(tensors)`` (a
    dict name -> tensor, edited in place), its metadata kept; returns the edited tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(out), metadata=meta)
    return tensors
