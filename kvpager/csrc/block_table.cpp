// The row primitives of kvpager.block_table.BlockTables in C++ (the Python twin: PyRows).
//
// BlockTables owns the numpy buffers (passed here as addresses and kept alive by it), its row
// order and handle -> row index (a list and a dict it never rebinds, read here) and the checks
// that name a bad value. A primitive takes its data as arguments (page ids, lengths), never
// reads a Python attribute, and gives the same result as PyRows bit for bit; tests drive both
// and compare the buffers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

class Rows {
 public:
  Rows(uintptr_t table, uintptr_t lens, uintptr_t pages, uintptr_t dirty, int max_batch,
       int max_pages, int page_size, py::list handles, py::dict row_of)
      : table_(reinterpret_cast<int32_t*>(table)),
        lens_(reinterpret_cast<int32_t*>(lens)),
        pages_(reinterpret_cast<int32_t*>(pages)),
        dirty_(reinterpret_cast<uint8_t*>(dirty)),
        max_batch_(max_batch),
        max_pages_(max_pages),
        page_size_(page_size),
        handles_(std::move(handles)),
        row_of_(std::move(row_of)),
        extra_(max_batch, 0) {}

  // ids into entries [start, start + len(ids)); the row then holds that many pages (an earlier
  // occupant's entries past them are padded); num_tokens >= 0 sets its length. False, nothing
  // changed, when an id is not an int in [0, 2^31).
  bool write(Py_ssize_t row, py::handle ids, Py_ssize_t start, int64_t num_tokens) {
    flat_.clear();
    if (!append_ids(ids.ptr())) return false;
    const int64_t count = static_cast<int64_t>(flat_.size());
    const int64_t end = start + count, old = pages_[row];
    int32_t* out = table_ + row * max_pages_;
    if (count) std::memcpy(out + start, flat_.data(), count * sizeof(int32_t));
    if (old > end) std::memset(out + end, 0, (old - end) * sizeof(int32_t));  // PAD_PAGE
    pages_[row] = static_cast<int32_t>(end);
    if (num_tokens >= 0) lens_[row] = static_cast<int32_t>(num_tokens);
    dirty_[row] = 1;
    return true;
  }

  // Row src's pages and length into row dst.
  void move(Py_ssize_t src, Py_ssize_t dst) {
    const int32_t count = pages_[src], old = pages_[dst];
    int32_t* out = table_ + dst * max_pages_;
    std::memcpy(out, table_ + src * max_pages_, count * sizeof(int32_t));
    if (old > count) std::memset(out + count, 0, (old - count) * sizeof(int32_t));
    pages_[dst] = count;
    lens_[dst] = lens_[src];
    dirty_[dst] = 1;
  }

  // (handle, pages held) of the rows r < batch whose length + n (per_row[r] when given)
  // exceeds their pages * page_size.
  py::list crossing(int64_t n, py::object per_row, Py_ssize_t batch) {
    const int64_t* step = amounts(per_row, batch);
    py::list rows;
    for (Py_ssize_t r = 0; r < batch; ++r) {
      if (lens_[r] + (step ? step[r] : n) > static_cast<int64_t>(pages_[r]) * page_size_) {
        rows.append(py::make_tuple(py::handle(PyList_GET_ITEM(handles_.ptr(), r)), pages_[r]));
      }
    }
    return rows;
  }

  // Appends each (handle, ids) of new_pages to the handle's row, then every row r < batch grows
  // by n (per_row[r] when given). Returns -1; or, nothing changed, -2 (a handle without a row,
  // too many pages, a row listed twice, an id not an int in [0, 2^31)) or the first row whose
  // pages would hold too few tokens.
  Py_ssize_t grow(int64_t n, py::object per_row, Py_ssize_t batch, py::list new_pages) {
    const int64_t* step = amounts(per_row, batch);
    rows_.clear();
    flat_.clear();
    starts_.assign(1, 0);
    Py_ssize_t bad = -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(new_pages.ptr()) && bad == -1; ++i) {
      const Py_ssize_t row = new_row(PyList_GET_ITEM(new_pages.ptr(), i));
      if (row < 0) {
        bad = -2;
        break;
      }
      rows_.push_back(row);
      starts_.push_back(static_cast<int64_t>(flat_.size()));
      const int64_t count = starts_.back() - starts_[starts_.size() - 2];
      if (extra_[row] != 0 || pages_[row] + count > max_pages_) bad = -2;  // twice, too many
      extra_[row] = static_cast<int32_t>(count) + 1;  // extra_ is all 0 outside this call
    }
    for (Py_ssize_t r = 0; r < batch && bad == -1; ++r) {
      const int64_t add = step ? step[r] : n;
      const int32_t more = extra_[r] ? extra_[r] - 1 : 0;
      if (lens_[r] + add > static_cast<int64_t>(pages_[r] + more) * page_size_) bad = r;
    }
    for (size_t i = 0; i < rows_.size(); ++i) {
      const Py_ssize_t row = rows_[i];
      extra_[row] = 0;
      if (bad != -1) continue;
      const int64_t count = starts_[i + 1] - starts_[i];
      std::memcpy(table_ + row * max_pages_ + pages_[row], flat_.data() + starts_[i],
                  count * sizeof(int32_t));
      pages_[row] += static_cast<int32_t>(count);
      dirty_[row] = 1;
    }
    if (bad != -1) return bad;
    for (Py_ssize_t r = 0; r < batch; ++r) lens_[r] += static_cast<int32_t>(step ? step[r] : n);
    return -1;
  }

 private:
  // The row of one (handle, ids) pair, its ids appended to flat_; -1 when the handle holds no
  // row or an id is bad.
  Py_ssize_t new_row(PyObject* pair) {
    PyObject* seq = PySequence_Fast(pair, "");
    if (!seq) {
      PyErr_Clear();
      return -1;
    }
    Py_ssize_t row = -1;
    if (PySequence_Fast_GET_SIZE(seq) == 2) {
      PyObject* found = PyDict_GetItemWithError(row_of_.ptr(), PySequence_Fast_ITEMS(seq)[0]);
      if (found) row = PyLong_AsSsize_t(found);
      if (PyErr_Occurred()) {  // an unhashable handle
        PyErr_Clear();
        row = -1;
      }
      if (row >= 0 && !append_ids(PySequence_Fast_ITEMS(seq)[1])) row = -1;
    }
    Py_DECREF(seq);
    return row;
  }

  // Per-row amounts: None (nullptr), or a C-contiguous int64 buffer of `batch` values (the
  // caller, BlockTables, made it so). It stays alive while the caller holds per_row.
  static const int64_t* amounts(const py::object& per_row, Py_ssize_t batch) {
    if (per_row.is_none()) return nullptr;
    py::buffer_info info = py::buffer(per_row).request();
    if (info.itemsize != 8 || info.ndim != 1 || info.shape[0] != batch) {
      throw py::value_error("per_row must be int64 [batch]");
    }
    return static_cast<const int64_t*>(info.ptr);
  }

  // Appends the ids of a sequence to flat_; false (flat_ partly filled) on a bad one.
  bool append_ids(PyObject* ids) {
    PyObject* seq = PySequence_Fast(ids, "page ids must be a sequence");
    if (!seq) {
      PyErr_Clear();
      return false;
    }
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    bool ok = true;
    for (Py_ssize_t i = 0; i < count && ok; ++i) {
      int32_t id;
      ok = page_id(items[i], &id);
      if (ok) flat_.push_back(id);
    }
    Py_DECREF(seq);
    return ok;
  }

  // An int (or an object with __index__, as Python's array accepts) in [0, 2^31).
  static bool page_id(PyObject* item, int32_t* out) {
    py::object index = py::reinterpret_steal<py::object>(
        PyLong_Check(item) ? (Py_INCREF(item), item) : PyNumber_Index(item));
    if (!index) {
      PyErr_Clear();
      return false;
    }
    int overflow = 0;
    const long long id = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow || id < 0 || id > INT32_MAX) {
      PyErr_Clear();
      return false;
    }
    *out = static_cast<int32_t>(id);
    return true;
  }

  int32_t* table_;
  int32_t* lens_;
  int32_t* pages_;
  uint8_t* dirty_;
  const int max_batch_, max_pages_, page_size_;
  py::list handles_;  // BlockTables' row order
  py::dict row_of_;   // BlockTables' handle -> row
  std::vector<int32_t> flat_;     // ids being converted
  std::vector<Py_ssize_t> rows_;  // grow(): the rows that gain ids
  std::vector<int64_t> starts_;   // grow(): where each row's ids start in flat_
  std::vector<int32_t> extra_;    // grow(): per row, 1 + the ids it gains (0 outside a call)
};

}  // namespace

PYBIND11_MODULE(_block_table, m) {
  m.doc() = "C++ row primitives of kvpager.block_table.BlockTables (see block_table.cpp)";
  py::class_<Rows>(m, "Rows")
      .def(py::init<uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, int, int, py::list,
                    py::dict>())
      .def("write", &Rows::write)
      .def("move", &Rows::move)
      .def("crossing", &Rows::crossing)
      .def("grow", &Rows::grow);
}
