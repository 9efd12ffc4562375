// Direct calls of the CPU kernels from Python (_C.call_cpu): each Python argument becomes the kernel's C++
// parameter without a new reference to any tensor, and the kernel is called as a plain function.
//
// Through the dispatcher (op.redispatchBoxed), every tensor of a list argument was copied into an IValue
// list and again into the kernel's std::vector. For a tensor that Python holds, each change of its C++
// reference count between 1 and 2 calls into the interpreter (torch keeps the Python object alive that
// way), and dropping those references after the kernel touches every tensor's object again, long evicted
// from the caches by the kernel's own streams: with 2,000 tensors per list, as for FusedLAMB on 2,000
// separate tensors, that was most of the call's host time (holding one reference per tensor instead of
// borrowing it: 1.22x the flat call's time against 1.10x, ad hoc). A direct call borrows the tensors that
// Python holds. It is for plain CPU tensors in eager mode (the callers check:
// dynbatch_kernels/checks.py eager()), as is any direct kernel call: a kernel that a user registers for
// these operators through torch.library is not called on this path. As with any kernel, another thread
// must not change an operand while the call runs (`t.data = ...`, `set_`, `resize_`, and here also
// torch.utils.swap_tensors, which cannot see a borrowed tensor in use); changing the caller's list is safe.
// A kernel may copy a tensor argument (the copy takes its own reference); it must not keep the argument
// itself, or its TensorList, beyond the call.
//
// Each kernel file registers its kernels with DYNBATCH_DIRECT next to TORCH_LIBRARY_IMPL. A kernel takes
// tensors as `const at::Tensor&`, `const std::optional<at::Tensor>&`, `at::TensorList` or
// `std::optional<at::TensorList>`, and scalars as double, int64_t or bool.
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "scans.h"

namespace dynbatch::direct {

// obj as the tensor Python holds (a TypeError naming `name` otherwise).
inline const at::Tensor& tensor_arg(PyObject* obj, const std::string& name) {
  TORCH_CHECK_TYPE(is_tensor(obj), name, ": expected a torch.Tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// A tensor sharing t's TensorImpl without a reference of its own; release() it instead of dropping it.
inline at::Tensor borrow(const at::Tensor& t) {
  return at::Tensor(c10::intrusive_ptr<at::TensorImpl, at::UndefinedTensorImpl>::reclaim(t.unsafeGetTensorImpl()));
}

inline void release(at::Tensor& t) { t.unsafeReleaseTensorImpl(); }

// The tensors of a list or tuple argument, borrowed. The items are held in a tuple of their own for the
// call: with the GIL released, another thread may change the caller's list, never this tuple.
class Borrowed {
 public:
  Borrowed(PyObject* obj, const std::string& name) {
    TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), name, ": expected a list of tensors, got ",
                     Py_TYPE(obj)->tp_name);
    items_ = THPObjectPtr(PySequence_Tuple(obj));
    if (!items_) throw python_error();
    const Py_ssize_t count = PyTuple_GET_SIZE(items_.get());
    // Every item checked before the first is borrowed: a throw must not leave borrowed tensors to drop.
    for (Py_ssize_t i = 0; i < count; ++i) tensor_arg(PyTuple_GET_ITEM(items_.get(), i), name);
    tensors_.reserve(count);
    for (Py_ssize_t i = 0; i < count; ++i) {
      tensors_.push_back(borrow(THPVariable_Unpack(PyTuple_GET_ITEM(items_.get(), i))));
    }
  }
  ~Borrowed() {
    for (at::Tensor& t : tensors_) release(t);
  }
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;

  at::TensorList get() const { return tensors_; }

 private:
  THPObjectPtr items_;
  std::vector<at::Tensor> tensors_;
};

// A Python argument as the kernel parameter type T (constructed in place: never copied or moved).
template <typename T>
struct Arg;

template <>
struct Arg<const at::Tensor&> {
  const at::Tensor& value;
  Arg(PyObject* obj, const c10::Argument& a) : value(tensor_arg(obj, a.name())) {}
  const at::Tensor& get() const { return value; }
};

template <>
struct Arg<const std::optional<at::Tensor>&> {
  std::optional<at::Tensor> value;
  Arg(PyObject* obj, const c10::Argument& a) {
    if (obj != Py_None) value = borrow(tensor_arg(obj, a.name()));
  }
  ~Arg() {
    if (value) release(*value);
  }
  Arg(const Arg&) = delete;
  Arg& operator=(const Arg&) = delete;
  const std::optional<at::Tensor>& get() const { return value; }
};

template <>
struct Arg<at::TensorList> {
  Borrowed list;
  Arg(PyObject* obj, const c10::Argument& a) : list(obj, a.name()) {}
  at::TensorList get() const { return list.get(); }
};

template <>
struct Arg<std::optional<at::TensorList>> {
  std::optional<Borrowed> list;
  Arg(PyObject* obj, const c10::Argument& a) {
    if (obj != Py_None) list.emplace(obj, a.name());
  }
  std::optional<at::TensorList> get() const {
    return list ? std::optional<at::TensorList>(list->get()) : std::nullopt;
  }
};

// A Python number as T through `convert` (PyFloat_AsDouble, PyLong_AsLongLong), or a TypeError naming
// the argument.
template <typename T, T (*convert)(PyObject*)>
struct Number {
  T value;
  Number(PyObject* obj, const c10::Argument& a, const char* expected) : value(convert(obj)) {
    if (value == T(-1) && PyErr_Occurred()) {
      if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw python_error();  // e.g. an int too large
      PyErr_Clear();
      TORCH_CHECK_TYPE(false, a.name(), ": expected ", expected, ", got ", Py_TYPE(obj)->tp_name);
    }
  }
  T get() const { return value; }
};

template <>
struct Arg<double> : Number<double, PyFloat_AsDouble> {
  Arg(PyObject* obj, const c10::Argument& a) : Number(obj, a, "a float") {}
};

template <>
struct Arg<int64_t> : Number<long long, PyLong_AsLongLong> {
  Arg(PyObject* obj, const c10::Argument& a) : Number(obj, a, "an int") {}
};

template <>
struct Arg<bool> {
  bool value;
  Arg(PyObject* obj, const c10::Argument& a) : value(obj == Py_True) {
    TORCH_CHECK_TYPE(PyBool_Check(obj), a.name(), ": expected a bool, got ", Py_TYPE(obj)->tp_name);
  }
  bool get() const { return value; }
};

// Calls a kernel on args (the operator's name, then one Python argument per entry of `schema`, the
// operator's arguments in order); returns its tensor, or None.
using Caller = PyObject* (*)(PyObject* args, const std::vector<c10::Argument>& schema);

// Adds the caller of the operator `name` ("dynbatch_cpp::lamb_step_") for _C.call_cpu; returns true.
bool add(const char* name, Caller caller);

// The caller of `name`, or null.
Caller find(const std::string& name);

template <typename Ret, typename... Params, size_t... I>
PyObject* invoke(Ret (*kernel)(Params...), PyObject* args, const std::vector<c10::Argument>& schema,
                 std::index_sequence<I...>) {
  TORCH_INTERNAL_ASSERT(schema.size() == sizeof...(Params) &&
                        static_cast<size_t>(PyTuple_GET_SIZE(args)) == schema.size() + 1);
  std::tuple<std::optional<Arg<Params>>...> converted;
  (std::get<I>(converted).emplace(PyTuple_GET_ITEM(args, I + 1), schema[I]), ...);  // in order
  if constexpr (std::is_void_v<Ret>) {
    {
      pybind11::gil_scoped_release no_gil;
      kernel(std::get<I>(converted)->get()...);
    }
    Py_RETURN_NONE;
  } else {
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = kernel(std::get<I>(converted)->get()...);
    }
    return THPVariable_Wrap(std::move(out));
  }
}

template <typename Ret, typename... Params>
constexpr size_t arity(Ret (*)(Params...)) {
  return sizeof...(Params);
}

template <auto kKernel>
PyObject* call(PyObject* args, const std::vector<c10::Argument>& schema) {
  return invoke(kKernel, args, schema, std::make_index_sequence<arity(kKernel)>{});
}

}  // namespace dynbatch::direct

// Registers `kernel` as the direct call of the operator dynbatch_cpp::<op>.
#define DYNBATCH_DIRECT(op, kernel)              \
  [[maybe_unused]] const bool kDirect_##op = \
      ::dynbatch::direct::add("dynbatch_cpp::" #op, &::dynbatch::direct::call<&kernel>)
