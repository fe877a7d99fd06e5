"""INT8 calibration: a data reader over dmrx files, the range cache, and the precision report.

from dmrx.calibration import DataFileReader, RangeCache, METHODS, report_table
"""

from dmrx.calibration.cache import RangeCache, cache_key
from dmrx.calibration.reader import MIN_ROWS, DataFileReader, check_calibration_file
from dmrx.calibration.report import precision_report, report_table
from dmrx.choices import CALIB_METHODS

METHODS = CALIB_METHODS

__all__ = [
    "METHODS",
    "MIN_ROWS",
    "DataFileReader",
    "RangeCache",
    "cache_key",
    "check_calibration_file",
    "precision_report",
    "report_table",
]
