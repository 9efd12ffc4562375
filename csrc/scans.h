// Per-step scans over every parameter of a layout, exported as dynbatch_kernels._C functions: what the
// optimizers and the layout read from each tensor once or twice per step, without a Python call per
// tensor and attribute (on 2,000 parameters such Python scans cost milliseconds per step, most of them
// cache misses on tensors that the step's kernels have evicted). dynbatch_kernels/scans.py has the same
// functions in Python (used when the extension is not built; the tests compare the two).
#pragma once

#include <Python.h>

namespace dynbatch {

// Whether obj is a torch.Tensor (its type or a subclass): a real type check, so an object that only
// claims torch.Tensor as its __class__ (a mock) is refused, not unpacked.
bool is_tensor(PyObject* obj);

namespace scans {

// tensor_marks(tensors): [(t.data_ptr(), t._version) for t in tensors].
PyObject* tensor_marks(PyObject* module, PyObject* tensors);

// grads_of(owners): (grads, missing, frozen): every owner's .grad (None where it has none), the indices
// of those without one, and the indices of those with requires_grad=False.
PyObject* grads_of(PyObject* module, PyObject* owners);

// misfits(tensors, starts): the indices j whose tensor is None, or, when starts is None, not contiguous,
// else neither empty nor starting at address starts[j] (not the view of its segment of a flat buffer).
PyObject* misfits(PyObject* module, PyObject* args);

}  // namespace scans
}  // namespace dynbatch
