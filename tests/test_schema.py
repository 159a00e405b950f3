"""The CUDA and Triton kernels' schema numbers against the one schema, name by name.

python/fusedopt/engine/layout.py declares the block size, tensor-table rows, hyperparameter
columns, global slots, reduction ops and algorithm codes; python/fusedopt/engine/int8.py the 8-bit
state's group size, exponent and mantissa bits and smallest scale; each
python/fusedopt/algorithms/<name>.py its own hyperparameter columns (HYPER), state (STATE), 8-bit
formats (STATE_CODES) and statistics (STATS). csrc/layout.h and csrc/algorithms/<name>.cuh repeat
them for the compiler, and fusedopt._C.schema() exports what the kernels were compiled with.
Every number is compared under its name, so changing one on either side (a reordered tuple,
BLOCK, HYPER_COLUMNS, GLOBAL_SLOTS, MAX_STAT_COLUMNS, MAX_STATES, a statistic's op, an int8
constant or format) fails here, on CPU: the module links cudart statically and schema() touches no
device. The Triton kernels take constexpr copies (fusedopt.triton_kernels.layout, and each
triton_kernels/algorithms/<name>.py its state and statistics counts): compared here too.
"""
import importlib

import pytest

from fusedopt.engine import int8, layout


@pytest.fixture(scope="module")
def schema():
    try:
        compiled = importlib.import_module("fusedopt._C")
    except ImportError as err:
        pytest.skip(f"fusedopt._C is not built (pip install -e . with nvcc on PATH): {err}")
    return compiled.schema()


def named(names, prefix=""):
    """{name: number} of a layout.py name tuple, where a name's number is both its position in
    the tuple and the constant layout.<PREFIX><NAME>."""
    numbers = {name: position for position, name in enumerate(names)}
    constants = {name: getattr(layout, prefix + name.upper()) for name in names}
    assert constants == numbers, f"layout.py's constants {constants} disagree with {names}"
    return numbers


def test_block(schema):
    assert schema["block"] == layout.BLOCK
    assert schema["state_align"] == layout.STATE_ALIGN


def test_table_rows(schema):
    assert schema["table_rows"] == named(layout.TABLE_ROWS_NAMES)
    assert len(schema["table_rows"]) == layout.TABLE_ROWS


def test_hyper_columns(schema):
    assert schema["common_hyper"] == named(layout.COMMON_HYPER)
    assert schema["first_algorithm_column"] == layout.FIRST_ALGORITHM_COLUMN
    assert schema["hyper_columns"] == layout.HYPER_COLUMNS


def test_globals(schema):
    assert schema["globals"] == named(layout.GLOBALS)
    assert schema["global_slots"] == layout.GLOBAL_SLOTS
    assert max(schema["globals"].values()) < layout.GLOBAL_SLOTS


def test_reduction_ops(schema):
    assert schema["ops"] == named(layout.OPS, prefix="OP_")
    assert schema["grad_sum_ops"] == list(layout.GRAD_SUM_OPS)


def test_limits(schema):
    assert schema["max_stat_columns"] == layout.MAX_STAT_COLUMNS
    assert schema["max_states"] == layout.MAX_STATES


def test_int8_constants(schema):
    assert schema["int8"] == {"group": int8.GROUP, "exponent_bits": int8.EXPONENT_BITS,
                              "mantissa_bits": dict(int8.MANTISSA_BITS),
                              "min_scale": int8.MIN_SCALE}
    assert layout.STATE_ALIGN % int8.GROUP == 0


def test_algorithm_codes(schema):
    codes = {name: entry["code"] for name, entry in schema["algorithms"].items()}
    assert codes == {name: code for code, name in enumerate(layout.ALGORITHMS)}


@pytest.mark.parametrize("name", layout.ALGORITHMS)
def test_algorithm(schema, name):
    module = importlib.import_module(f"fusedopt.algorithms.{name}")
    compiled = schema["algorithms"][name]
    assert module.NAME == name
    # The algorithm's own columns follow the common ones, in HYPER order (layout.hyper_columns
    # also checks they fit the table).
    columns = layout.hyper_columns(module.HYPER)
    assert compiled["hyper"] == {column: columns[column] for column in module.HYPER}
    assert compiled["states"] == len(module.STATE) <= layout.MAX_STATES
    assert compiled["stats"] == len(module.STATS) <= layout.MAX_STAT_COLUMNS
    assert compiled["stat_ops"] == [op for _, op in module.STATS]
    assert compiled["state_codes"] == list(module.STATE_CODES)
    assert len(module.STATE_CODES) == len(module.STATE)
    assert set(module.STATE_CODES) <= set(int8.MANTISSA_BITS)


# ----------------------------------------------------------------- the Triton module's copy
@pytest.fixture(scope="module")
def triton_layout():
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    return importlib.import_module("fusedopt.triton_kernels.layout")


def test_triton_layout_constants(triton_layout):
    names = {"BLOCK": layout.BLOCK, "STATE_ALIGN": layout.STATE_ALIGN,
             "HYPER_COLUMNS": layout.HYPER_COLUMNS,
             "FIRST_ALGORITHM_COLUMN": layout.FIRST_ALGORITHM_COLUMN}
    names.update({name.upper(): number for name, number in named(layout.TABLE_ROWS_NAMES).items()})
    names.update({name.upper(): number for name, number in named(layout.COMMON_HYPER).items()})
    names.update({name.upper(): number for name, number in named(layout.GLOBALS).items()})
    assert {name: getattr(triton_layout, name).value for name in names} == names


@pytest.mark.parametrize("name", layout.ALGORITHMS)
def test_triton_algorithm(triton_layout, name):
    module = importlib.import_module(f"fusedopt.algorithms.{name}")
    kernel = importlib.import_module(f"fusedopt.triton_kernels.algorithms.{name}")
    registry = importlib.import_module("fusedopt.triton_kernels.algorithms").REGISTRY
    assert registry[name] is kernel
    columns = layout.hyper_columns(module.HYPER)
    assert {column: getattr(kernel, column.upper()).value for column in module.HYPER} == {
        column: columns[column] for column in module.HYPER}
    assert kernel.NUM_STATES == len(module.STATE)
    assert kernel.NUM_STATS == len(module.STATS)
    assert kernel.STAT_OPS == sum(op << (2 * c) for c, (_, op) in enumerate(module.STATS))
