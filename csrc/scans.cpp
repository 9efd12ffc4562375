// The per-step parameter scans of scans.h.
#include "scans.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/object_ptr.h>

namespace dynbatch {
namespace scans {
namespace {

// The items of a list or tuple argument (a TypeError naming `name` otherwise).
PyObject** sequence_items(PyObject* obj, const char* name, Py_ssize_t* count) {
  TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), name, ": expected a list, got ",
                   Py_TYPE(obj)->tp_name);
  *count = PySequence_Fast_GET_SIZE(obj);
  return PySequence_Fast_ITEMS(obj);
}

const at::Tensor& tensor_item(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a list of tensors, got an item of type ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// Prefetches what reading the tensors of items[i..] will touch, a few items ahead of the scan at i, one
// pointer further per stage: the Python object of item i + 4 * kAhead; the TensorImpl of item
// i + 3 * kAhead (its address read from the object prefetched kAhead items before); the storage, version
// counter and autograd metadata of item i + 2 * kAhead; with `grads`, the TensorImpl of the .grad of item
// i + kAhead. The scans chase these pointers through objects that the step's kernels have evicted from
// the caches: without prefetches every miss waits for the one before.
constexpr Py_ssize_t kAhead = 4;

const c10::TensorImpl* impl_of(PyObject* item) {
  return THPVariable_CheckExact(item) ? THPVariable_Unpack(item).unsafeGetTensorImpl() : nullptr;
}

void prefetch_lines(const void* address, int lines) {
  for (int line = 0; line < lines; ++line) __builtin_prefetch(static_cast<const char*>(address) + 64 * line);
}

void prefetch_ahead(PyObject** items, Py_ssize_t i, Py_ssize_t count, bool grads = false) {
  if (i + 4 * kAhead < count) __builtin_prefetch(items[i + 4 * kAhead]);
  if (i + 3 * kAhead < count) {
    if (const auto* impl = impl_of(items[i + 3 * kAhead])) prefetch_lines(impl, 4);
  }
  if (i + 2 * kAhead < count) {
    if (const auto* impl = impl_of(items[i + 2 * kAhead])) {
      __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
      // a VariableVersion is one pointer, to the counter it shares with the tensor's views
      __builtin_prefetch(*reinterpret_cast<void* const*>(&impl->version_counter()));
      __builtin_prefetch(impl->autograd_meta());
    }
  }
  if (grads && i + kAhead < count) {
    if (const auto* impl = impl_of(items[i + kAhead])) {
      const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
      if (meta != nullptr && meta->grad_.defined()) prefetch_lines(meta->grad_.unsafeGetTensorImpl(), 4);
    }
  }
}

// Appends index i to list (a new Python int); false on error.
bool append_index(PyObject* list, Py_ssize_t i) {
  THPObjectPtr index(PyLong_FromSsize_t(i));
  return index && PyList_Append(list, index.get()) == 0;
}

}  // namespace

PyObject* tensor_marks(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(tensors, "tensors", &count);
  THPObjectPtr marks(PyList_New(count));
  if (!marks) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    prefetch_ahead(items, i, count);
    const at::Tensor& t = tensor_item(items[i], "tensors");
    THPObjectPtr address(PyLong_FromVoidPtr(t.data_ptr()));
    THPObjectPtr version(PyLong_FromLongLong(static_cast<long long>(t._version())));
    if (!address || !version) return nullptr;
    PyObject* mark = PyTuple_Pack(2, address.get(), version.get());
    if (mark == nullptr) return nullptr;
    PyList_SET_ITEM(marks.get(), i, mark);
  }
  return marks.release();
  END_HANDLE_TH_ERRORS
}

PyObject* grads_of(PyObject* /*module*/, PyObject* owners) {
  HANDLE_TH_ERRORS
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(owners, "owners", &count);
  THPObjectPtr grads(PyList_New(count));
  THPObjectPtr missing(PyList_New(0));
  THPObjectPtr frozen(PyList_New(0));
  if (!grads || !missing || !frozen) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    prefetch_ahead(items, i, count, /*grads=*/true);
    PyObject* owner = items[i];
    const at::Tensor& t = tensor_item(owner, "owners");
    PyObject* grad = nullptr;
    bool requires_grad = t.requires_grad();
    if (THPVariable_CheckExact(owner)) {
      const at::Tensor& g = t.grad();
      grad = g.defined() ? THPVariable_Wrap(g) : Py_NewRef(Py_None);
    } else {  // a subclass may define .grad or requires_grad itself: ask Python
      grad = PyObject_GetAttrString(owner, "grad");
      THPObjectPtr flag(PyObject_GetAttrString(owner, "requires_grad"));
      if (!flag) {
        Py_XDECREF(grad);
        return nullptr;
      }
      const int truth = PyObject_IsTrue(flag.get());
      if (truth < 0) {
        Py_XDECREF(grad);
        return nullptr;
      }
      requires_grad = truth == 1;
    }
    if (grad == nullptr) return nullptr;
    PyList_SET_ITEM(grads.get(), i, grad);
    if (grad == Py_None && !append_index(missing.get(), i)) return nullptr;
    if (!requires_grad && !append_index(frozen.get(), i)) return nullptr;
  }
  return PyTuple_Pack(3, grads.get(), missing.get(), frozen.get());
  END_HANDLE_TH_ERRORS
}

PyObject* misfits(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  PyObject* starts = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &tensors, &starts)) return nullptr;
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(tensors, "tensors", &count);
  PyObject** addresses = nullptr;
  if (starts != Py_None) {
    Py_ssize_t starts_count = 0;
    addresses = sequence_items(starts, "starts", &starts_count);
    TORCH_CHECK_VALUE(starts_count == count, "starts: expected ", count, " addresses (one per tensor), got ",
                      starts_count);
  }
  THPObjectPtr out(PyList_New(0));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    prefetch_ahead(items, i, count);
    bool misfit = items[i] == Py_None;
    if (!misfit) {
      const at::Tensor& t = tensor_item(items[i], "tensors");
      if (addresses == nullptr) {
        misfit = !t.is_contiguous();
      } else {
        void* start = PyLong_AsVoidPtr(addresses[i]);
        if (start == nullptr && PyErr_Occurred()) return nullptr;
        misfit = t.data_ptr() != start && t.numel() != 0;
      }
    }
    if (misfit && !append_index(out.get(), i)) return nullptr;
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

}  // namespace scans
}  // namespace dynbatch
