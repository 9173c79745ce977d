"""Hostile but realistic input for `fahr evaluate`, through the real command line (``run_fahr``).

Every case ends in exactly one of three ways, asserted here:

- an error: exit status 2 and one stderr line ``fahr evaluate: error: ...`` naming the culprit (the
  file, the option key, the configured column, a count or a file line), never a traceback;
- a flagged result: exit status 0, the flag in summary.json, report.md and the log, and no
  normal-looking number where none can be estimated;
- a correct result: exit status 0 and the number lifelines gives on the clean data.

In every case the patient ids seeded in the table (``PATIENT-77xx``, or 9-digit numbers) never
appear in stdout, stderr or any output file. Inputs are generated; nothing binary is stored.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

import fahr.pipeline.evaluate as evaluate_module

ID_TEXT = "PATIENT-77"  # every text id starts so; PATIENT-7731 is one of them
ID_NUMBER = "9182736"  # every numeric id starts so
N = 200
BASE = ["columns.patient=pid", "covariates=[age,sex]"]


def cohort(n: int = N, seed: int = 7, risk: bool = True) -> pd.DataFrame:
    """A synthetic cohort: FaceAge and risk raise the hazard; ~55% events; ids in `pid` and `num_id`.
    Without ``risk`` the risk marker is absent (skipped: one Kaplan-Meier figure, a faster run)."""
    rng = np.random.default_rng(seed)
    age = rng.normal(65, 10, n).round(1)
    sex = rng.choice(["F", "M"], n, p=[0.45, 0.55])
    faceage = (age + rng.normal(0, 6, n)).round(2)
    marker = rng.normal(0, 1, n).round(4)
    hazard = np.exp(0.04 * (faceage - 65) + 0.5 * marker + 0.2 * (sex == "M"))
    t, c = rng.exponential(900 / hazard), rng.uniform(300, 1500, n)
    df = pd.DataFrame({"pid": [f"PATIENT-{7700 + i}" for i in range(n)],
                       "num_id": [918273600 + i for i in range(n)],
                       "time": np.ceil(np.minimum(t, c)).astype(int), "event": (t <= c).astype(int),
                       "faceage": faceage, "risk": marker, "age": age, "sex": sex})
    return df if risk else df.drop(columns="risk")


def reference_hr(df: pd.DataFrame, marker: str = "faceage", per: float = 10.0) -> float:
    """Adjusted HR of ``marker`` (per ``per`` units) for age and sex, straight from lifelines."""
    frame = df[["time", "event", "age", marker]].astype(float).assign(sex_M=(df["sex"] == "M").astype(float))
    cph = CoxPHFitter().fit(frame, "time", "event")
    return math.exp(per * cph.params_[marker])


@pytest.fixture(scope="module")
def clean_hr() -> float:
    return reference_hr(cohort())


class Case:
    def __init__(self, tmp: Path, run_fahr):
        self.tmp, self._run = tmp, run_fahr
        self.input = tmp / "cohort.csv"
        self.out = tmp / "out"
        self.r = None

    def write(self, df: pd.DataFrame, **kw) -> Path:
        df.to_csv(self.input, **{"index": False, **kw})
        return self.input

    def text(self, text: str, encoding: str = "utf-8") -> Path:
        self.input.write_bytes(text.encode(encoding))
        return self.input

    def run(self, *args: str, input=None, output=None, base=BASE):
        self.used_input = Path(input if input is not None else self.input)
        self.r = self._run("evaluate", f"input={self.used_input}",
                           f"output={output if output is not None else self.out}", *base, *args)
        self.assert_no_ids()
        return self.r

    def assert_no_ids(self) -> None:
        r = self.r
        assert "Traceback" not in r.err
        for stream in (r.out, r.err):
            assert ID_TEXT not in stream and ID_NUMBER not in stream, stream[-500:]
        if self.out.is_dir():
            for path in self.out.rglob("*"):
                if path.is_file() and path.resolve() != self.used_input.resolve():
                    data = path.read_bytes()
                    assert ID_TEXT.encode() not in data and ID_NUMBER.encode() not in data, path

    def error(self, *args: str, input=None, output=None, base=BASE) -> str:  # noqa: A002
        """Run; expect one error line (exit 2); return it."""
        r = self.run(*args, input=input, output=output, base=base)
        assert r.status == 2, r
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fahr evaluate: error: "), r.err
        return lines[0]

    def ok(self, *args: str, input=None, base=BASE) -> dict:
        r = self.run(*args, input=input, base=base)
        assert r.status == 0, r
        assert r.err.strip() == "", r.err
        return json.loads((self.out / "summary.json").read_text())

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.out / f"{name}.csv", keep_default_na=False, na_values=[""])

    def adjusted(self, marker: str = "faceage") -> pd.Series:
        return self.table("hazard_ratios").query(f"marker == '{marker}' and model == 'adjusted'").iloc[0]


@pytest.fixture
def case(tmp_path, run_fahr) -> Case:
    return Case(tmp_path, run_fahr)


def checks(summary: dict) -> set[str]:
    return {f["check"] for f in summary["flags"]}


def assert_flagged(case: Case, summary: dict, check: str) -> None:
    """The flag is in summary.json, in the report's Flags section and in the log."""
    assert check in checks(summary), summary["flags"]
    report = (case.out / "report.md").read_text()
    flags_section = report.split("## Flags", 1)[1].split("## Covariates", 1)[0]
    assert f"**{check}**" in flags_section
    assert f"flag {check}" in case.r.out


# ---------------------------------------------------------------- the file itself


def test_missing_file(case):
    line = case.error(input=case.tmp / "nope.csv")
    assert "input " in line and "nope.csv" in line and "no such file" in line


def test_directory_as_input(case):
    (case.tmp / "adir").mkdir()
    assert "is a directory" in case.error(input=case.tmp / "adir")


def test_fifo_does_not_hang(case):
    fifo = case.tmp / "pipe.csv"
    os.mkfifo(fifo)
    line = case.error(input=fifo)
    assert "pipe.csv" in line and "FIFO" in line


def test_dev_zero_is_not_read(case):
    assert "character device" in case.error(input="/dev/zero")


def test_symlink_to_dev_zero(case):
    link = case.tmp / "zero.csv"
    link.symlink_to("/dev/zero")
    assert "zero.csv" in case.error(input=link)


def test_binary_file(case):
    case.input.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert "NUL bytes" in case.error()


def test_latin1_file(case):
    df = cohort()
    df["sex"] = np.where(df["sex"] == "F", "Femme", "Mâle")
    case.input.write_bytes(df.to_csv(index=False).encode("latin-1"))
    line = case.error()
    assert "cohort.csv" in line and "not UTF-8" in line


def test_too_large_file(case, monkeypatch):
    monkeypatch.setattr(evaluate_module, "MAX_INPUT_BYTES", 1000)
    case.write(cohort())
    assert "1,000-byte limit" in case.error()


def test_empty_file(case):
    case.text("")
    assert "empty, or no header row" in case.error()


def test_header_only(case):
    case.text("pid,time,event,faceage,risk,age,sex\n")
    assert "no data rows" in case.error()


def test_semicolon_separated(case):
    case.write(cohort(), sep=";")
    line = case.error()
    assert "columns.time='time'" in line and "';'-separated" in line


def test_tab_separated(case):
    case.write(cohort(), sep="\t")
    assert "tab-separated" in case.error()


def test_headerless_csv_never_echoes_its_first_row(case):
    case.input.write_text(cohort().drop(columns=["pid", "sex"]).to_csv(index=False, header=False))
    line = case.error(base=["covariates=[age]"])
    assert "columns.time='time'" in line and "has 6 column(s)" in line and "looks like data" in line
    assert "918273600" not in line


def test_headerless_csv_with_ids_first(case):
    case.input.write_text(cohort().to_csv(index=False, header=False))
    line = case.error()
    assert "not in the table" in line and "has 8 column(s)" in line


def test_excel_sep_line(case):
    case.text("sep=,\n" + cohort().to_csv(index=False))
    assert "'sep=' line" in case.error()


def test_row_with_extra_cells(case):
    text = cohort().to_csv(index=False).splitlines()
    text[4] += ",oops"
    case.text("\n".join(text) + "\n")
    assert "line 5 has 9 cells, the header 8" in case.error()


def test_duplicate_column_names(case):
    df = cohort()
    case.text(df.to_csv(index=False).replace("num_id", "age", 1))
    assert "columns 2 and 7 of the header have the same name" in case.error()


def test_unnamed_index_column(case):
    case.write(cohort(), index=True)
    assert "column 1 of the header (line 1) has no name" in case.error()


def test_unterminated_quote(case):
    text = cohort().to_csv(index=False).splitlines()
    text[10] = text[10].replace(",F", ',"F', 1).replace(",M", ',"M', 1)
    case.text("\n".join(text) + "\n")
    line = case.error()
    assert "is not valid CSV" in line and "line" in line


def test_overlong_field(case):
    df = cohort()
    df.loc[3, "sex"] = "F" * (2 << 20)
    case.write(df)
    assert "a field is too long" in case.error()


def test_excel_export_bom_crlf_trailing_commas_and_blank_rows(case, clean_hr):
    """Excel quirks that carry no data must not change a number."""
    body = cohort(risk=False).to_csv(index=False, lineterminator="\r\n")
    lines = body.split("\r\n")
    text = "\ufeff" + lines[0] + "\r\n" + "".join(f"{line},\r\n" for line in lines[1:] if line) + ",,,,,,,,\r\n\r\n"
    case.text(text)
    summary = case.ok()
    assert summary["rows_read"] == N and summary["n"] == N
    assert case.adjusted()["hr"] == pytest.approx(clean_hr, abs=1e-9)


def test_quoted_numbers_and_padded_cells(case, clean_hr):
    df = cohort(risk=False)
    df["sex"] = df["sex"].map({"F": " F", "M": "M  "})
    case.write(df, quoting=1)  # csv.QUOTE_ALL: every number quoted
    case.ok()
    assert case.adjusted()["hr"] == pytest.approx(clean_hr, abs=1e-9)


def test_missing_codes_drop_rows(case):
    df = cohort(risk=False).astype({"faceage": object, "age": object})
    df.loc[[1, 2], "faceage"] = "NA"
    df.loc[3, "faceage"] = "."
    df.loc[4, "age"] = ""
    df.loc[5, "age"] = "#N/A"
    case.write(df)
    summary = case.ok()
    assert summary["dropped_incomplete"] == 5 and summary["n"] == N - 5
    assert case.adjusted()["hr"] == pytest.approx(reference_hr(cohort(risk=False).drop(index=[1, 2, 3, 4, 5])), abs=1e-9)


# ---------------------------------------------------------------- the output folder


def test_output_is_a_file(case):
    case.write(cohort())
    (case.tmp / "report.txt").write_text("keep me")
    line = case.error(output=case.tmp / "report.txt")
    assert "output=" in line and "report.txt" in line and "not a directory" in line
    assert (case.tmp / "report.txt").read_text() == "keep me"


def test_output_equals_input(case):
    case.write(cohort())
    before = case.input.read_bytes()
    assert "output=" in case.error(output=case.input)
    assert case.input.read_bytes() == before


def test_output_folder_holding_the_input_under_an_output_name(case):
    case.out.mkdir()
    source = case.out / "cindex.csv"
    cohort().to_csv(source, index=False)
    before = source.read_bytes()
    line = case.error(input=source)
    assert "would overwrite input" in line and "cindex.csv" in line
    assert source.read_bytes() == before


def test_output_under_a_file_is_refused_before_reading(case):
    case.write(cohort())
    (case.tmp / "afile").write_text("x")
    line = case.error(output=case.tmp / "afile" / "report")
    assert "output=" in line and "cannot create folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_output_read_only_folder(case):
    case.write(cohort())
    locked = case.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "cannot write in" in case.error(output=locked)
    finally:
        locked.chmod(0o700)


def test_empty_output(case):
    case.write(cohort())
    assert "output is empty" in case.error(output="")


def test_output_checked_before_the_input_is_read(case):
    (case.tmp / "afile").write_text("x")
    line = case.error(input=case.tmp / "nope.csv", output=case.tmp / "afile")
    assert "output=" in line


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("args,expected", [
    (["markers.faceage.per=0"], "markers.faceage.per=0"),
    (["markers.risk.per=-1"], "markers.risk.per=-1"),
    (["min_events=0"], "min_events must be at least 1, got 0"),
    (["max_levels=1"], "max_levels must be at least 2, got 1"),
    (["far.per=0"], "far.per must be greater than 0"),
    (["covariates=[age,age]"], "covariates lists ['age'] more than once"),
    (["categorical=[sex]", "covariates=[age]"], "categorical ['sex'] must also be listed in covariates"),
    (["far.column=far", "far.bins=[365-10]"], "far.bins[0]='365-10': lo is greater than hi"),
    (["far.column=far", "far.bins=[abc]"], "far.bins[0]='abc': expected 'lo-hi'"),
    (["far.column=far", "far.bins=[10-400,366-730]"], "overlap"),
    (["covariates=[age,time]"], "covariates[1]='time' is columns.time"),
    (["covariates=[event]"], "covariates[0]='event' is columns.event"),
    (["covariates=[pid]"], "covariates[0]='pid' is columns.patient, the patient id"),
    (["markers.faceage.column=event"], "markers.faceage.column='event' is columns.event"),
    (["markers.risk.column=time"], "markers.risk.column='time' is columns.time"),
    (["columns.event=time"], "columns.time and columns.event both name column 'time'"),
    (["markers.risk.column=faceage"], "markers.faceage and markers.risk both read column 'faceage'"),
    (["covariates=[age,faceage]"], "marker 'faceage' (column 'faceage') is also a covariate"),
    (["covariates=[age,nosuch]"], "covariates[1]='nosuch'"),
    (["+covariats=[age]"], "covariats"),
])
def test_bad_option(case, args, expected):
    case.write(cohort())
    assert expected in case.error(*args)


# ---------------------------------------------------------------- outcome columns


def spoil(case: Case, column: str, rows, value, dtype=object) -> None:
    df = cohort().astype({column: dtype})
    df.loc[rows, column] = value
    case.write(df)


def test_all_times_zero(case):
    spoil(case, "time", slice(None), 0, int)
    assert "all 200 follow-up times (column 'time') are equal (0)" in case.error()


def test_all_times_equal(case):
    spoil(case, "time", slice(None), 365, int)
    assert "are equal (one value)" in case.error()


def test_negative_time_names_the_line(case):
    spoil(case, "time", [3, 9], -5, int)
    assert "2 follow-up time(s) in column 'time' are negative, first at line 5" in case.error()


def test_infinite_time(case):
    spoil(case, "time", 6, "inf")
    assert "1 follow-up time(s) in column 'time' are NaN or infinite, first at line 8" in case.error()


def test_time_with_units_text(case):
    spoil(case, "time", 2, "12 days")
    assert "follow-up times in column 'time' must be numeric (1 cell(s) are not numbers, first at line 4)" in case.error()


def test_event_coded_1_2(case):
    df = cohort()
    df["event"] += 1
    case.write(df)
    assert "coded 1/2" in case.error()


def test_event_true_false(case, clean_hr):
    df = cohort(risk=False)
    df["event"] = df["event"].map({1: "TRUE", 0: "FALSE"})
    case.write(df)
    case.ok()
    assert case.adjusted()["hr"] == pytest.approx(clean_hr, abs=1e-9)


def test_event_yes_no(case):
    df = cohort()
    df["event"] = df["event"].map({1: "yes", 0: "no"})
    case.write(df)
    assert "must be 0 or 1 (or true/false), got non-numeric values (200 cell(s) are not numbers, first at line 2)" in case.error()


def test_event_missing_cell(case):
    spoil(case, "event", 11, "")
    assert "1 event indicator(s) in column 'event' are missing, first at line 13" in case.error()


def test_event_column_pointed_at_text_ids(case):
    case.write(cohort())
    assert "must be 0 or 1" in case.error("columns.event=pid", "columns.patient=null")


def test_event_column_pointed_at_numeric_ids(case):
    case.write(cohort())
    line = case.error("columns.event=num_id")
    assert "200 event indicator(s) in column 'num_id' are not 0 or 1, first at line 2" in line


def test_time_column_pointed_at_text_ids(case):
    case.write(cohort())
    assert "200 cell(s) are not numbers" in case.error("columns.time=pid", "columns.patient=null")


def test_all_censored(case):
    spoil(case, "event", slice(None), 0, int)
    assert "censored" in case.error()


def test_too_few_events(case):
    df = cohort()
    df["event"] = 0
    df.loc[:4, "event"] = 1
    case.write(df)
    assert "only 5 event(s) in the 200 analysed rows" in case.error()


def test_every_patient_an_event(case):
    df = cohort(risk=False)
    df["event"] = 1
    case.write(df)
    summary = case.ok()
    assert summary["events"] == N and not summary["flags"]
    assert case.adjusted()["hr"] == pytest.approx(reference_hr(df), abs=1e-9)


# ---------------------------------------------------------------- patients and dates


def test_duplicate_patients_counted_never_named(case):
    df = cohort()
    df.loc[5, "pid"] = df.loc[4, "pid"]
    df.loc[5, "time"] = df.loc[4, "time"]
    df.loc[5, "event"] = df.loc[4, "event"]
    case.write(df)
    assert "1 patient(s) have more than one row" in case.error()


def test_conflicting_duplicate(case):
    df = cohort()
    df.loc[5, "pid"] = "PATIENT-7731"
    case.write(df)
    assert "1 patient(s) have several rows with conflicting outcomes" in case.error()


def test_missing_patient_id(case):
    spoil(case, "pid", [7, 8], "")
    assert "2 row(s) have no patient id in column 'pid'" in case.error()


def dated(case: Case, photo: list[str]) -> str:
    df = cohort()
    df["photo"] = "2019-05-01"
    df["last"] = "2021-06-30"
    for i, value in enumerate(photo):
        df.loc[i + 1, "photo"] = value
    case.write(df)
    return case.error("columns.photo_date=photo", "columns.event_date=last")


def test_unparsable_dates(case):
    line = dated(case, ["31/02/2020", "n.d.", "2020-13-01"])
    assert "date column 'photo': 3 not dates cell(s), first at line 3" in line


def test_missing_dates(case):
    assert "date column 'photo': 2 empty cell(s), first at line 3" in dated(case, ["", ""])


def test_photo_after_event(case):
    assert "1 row(s) have a photo ('photo') dated after" in dated(case, ["2022-01-01"])


# ---------------------------------------------------------------- markers and covariates


def test_marker_infinite(case):
    spoil(case, "risk", [3, 4, 5], "-inf")
    assert "marker 'risk' (column 'risk') has 3 infinite value(s), first at line 5" in case.error()


def test_marker_excel_error_cell(case):
    spoil(case, "faceage", 12, "#DIV/0!")
    assert "marker 'faceage' (column 'faceage') is not numeric: 1 of 200 cell(s) are not numbers, first at line 14" \
        in case.error()


def test_numeric_covariate_with_stray_text(case):
    spoil(case, "age", [2, 3], "unknown")
    line = case.error()
    assert "covariate 'age': 2 cell(s) are not numbers (first at line 4) while 198 are" in line


def test_decimal_comma_marker(case):
    df = cohort().astype({"faceage": object})
    df["faceage"] = df["faceage"].map(lambda v: str(v).replace(".", ","))  # a European spreadsheet, quoted
    case.write(df)
    assert "marker 'faceage' (column 'faceage') is not numeric" in case.error()


def test_marker_column_entirely_empty(case):
    spoil(case, "faceage", slice(None), "")
    assert "no row has every covariate and marker present (200 rows read)" in case.error()


def test_covariate_column_entirely_empty(case):
    spoil(case, "age", slice(None), "NA")
    assert "no row has every covariate" in case.error()


def test_boolean_covariate(case):
    df = cohort(risk=False)
    df["smoker"] = np.where(np.arange(N) % 3 == 0, "TRUE", "FALSE")
    case.write(df)
    summary = case.ok("covariates=[age,sex,smoker]")
    assert summary["covariates"][2]["kind"] == "categorical" and summary["covariates"][2]["reference"] == "False"


def test_numeric_covariate_infinite(case):
    spoil(case, "age", 2, "Infinity")
    assert "covariate 'age' has 1 infinite value(s), first at line 4" in case.error()


def test_id_column_as_covariate_never_prints_levels(case):
    case.write(cohort())
    line = case.error("columns.patient=null", "covariates=[age,pid]")
    assert "covariate 'pid' has 200 distinct values in 200 rows" in line and "identifier" in line


def test_numeric_id_as_categorical_covariate(case):
    case.write(cohort())
    assert "covariate 'num_id' has 200 distinct values" in case.error("covariates=[age,num_id]", "categorical=[num_id]")


def test_many_levels_categorical(case):
    df = cohort()
    df["site"] = [f"site{i % 30}" for i in range(N)]
    case.write(df)
    assert "covariate 'site' has 30 distinct values in 200 rows" in case.error("covariates=[age,site]")


def test_level_lost_after_dropping_incomplete_rows(case):
    df = cohort().astype({"faceage": object})
    df["sex"] = "M"
    df.loc[:9, "sex"] = "F"
    df.loc[:9, "faceage"] = "NA"  # every F row lacks the marker
    case.write(df)
    assert "covariate 'sex' has a level with no patients" in case.error()


def test_levels_differing_only_in_case(case):
    df = cohort()
    df.loc[::3, "sex"] = df.loc[::3, "sex"].str.lower()
    case.write(df)
    assert "covariate 'sex': 4 levels, of which some differ only in letter case" in case.error()


def test_photo_date_without_event_date(case):
    df = cohort()
    df["photo"] = "2020-01-01"
    case.write(df)
    assert "columns.photo_date and columns.event_date go together" in case.error("columns.photo_date=photo")


def test_covariate_constant(case):
    df = cohort()
    df["sex"] = "F"
    case.write(df)
    assert "covariate 'sex' is constant" in case.error()


def test_separating_covariate_is_an_error(case):
    """A level without events: lifelines returns HR ~1e-9 with CI 0..inf and no error."""
    df = cohort()
    df.loc[df["sex"] == "F", "event"] = 0
    case.write(df)
    line = case.error()
    assert "covariate 'sex' separate(s) events in the clinical model" in line and "[" not in line


def test_separating_categorical_level_names_column_not_level(case):
    df = cohort()
    df["stage"] = np.where(np.arange(N) % 4 == 0, "IV-PATIENT-7731", "I")
    df.loc[df["stage"] != "I", "event"] = 1
    df.loc[df["stage"] != "I", "time"] = 1  # stage IV: every patient dies on day 1
    case.write(df)
    line = case.error("covariates=[age,sex,stage]")
    assert "covariate 'stage' separate(s) events" in line


def test_marker_equal_to_covariate_under_another_name(case):
    df = cohort()
    df["faceage"] = df["age"] * 1.5 + 3
    case.write(df)
    line = case.error()
    assert "marker 'faceage' (column 'faceage') is an exact linear function of covariate 'age'" in line


def test_marker_is_the_follow_up_time(case):
    df = cohort()
    df["risk"] = np.log(df["time"])
    case.write(df)
    assert "marker 'risk' (column 'risk') is the follow-up time in other units" in case.error()


def test_covariate_is_the_event_under_another_name(case):
    df = cohort()
    df["dead"] = df["event"]
    case.write(df)
    assert "covariate 'dead' equals the event indicator" in case.error("covariates=[age,dead]")


def test_two_codings_of_one_covariate(case):
    df = cohort()
    df["male"] = (df["sex"] == "M").astype(int)
    case.write(df)
    assert "covariate 'male' is an exact linear function of covariate 'sex'" in case.error("covariates=[age,sex,male]")


# ---------------------------------------------------------------- flagged results


def test_marker_that_knows_the_outcome_is_flagged_not_reported(case):
    """A leaked label (event + noise): the likelihood has no maximum; lifelines returns a huge HR."""
    df = cohort()
    df["risk"] = df["event"] + np.random.default_rng(2).uniform(0, 0.01, N)
    case.write(df)
    summary = case.ok()
    assert_flagged(case, summary, "separation")
    for model in ("adjusted", "unadjusted"):
        row = case.table("hazard_ratios").query(f"marker == 'risk' and model == '{model}'").iloc[0]
        assert math.isnan(row["hr"]) and math.isnan(row["ci_low"]) and "unbounded" in row["note"]
    q = case.table("quartiles").query("marker == 'risk'")
    assert q.iloc[0]["events"] == 0 and q.iloc[1:]["hr"].isna().all()
    assert_flagged(case, summary, "no_events_in_group")
    assert pd.isna(case.adjusted("faceage")["note"]) and case.adjusted("faceage")["hr"] > 1  # the other marker stands


def test_marker_ordering_every_death_is_flagged_not_reported(case):
    """Each death has the highest risk of everyone still at risk: Newton-Raphson does not converge."""
    df = cohort()
    df["risk"] = np.where(df["event"] == 1, 5000 - df["time"], -df["time"] / 10 - 10) + df.index / 1e6
    case.write(df)
    summary = case.ok()
    assert checks(summary) & {"separation", "not_converged"}
    row = case.adjusted("risk")
    assert math.isnan(row["hr"]) and math.isnan(row["p"]) and row["note"]


def test_quartile_without_events_is_flagged(case):
    df = cohort(risk=False)
    low = df["faceage"] <= df["faceage"].quantile(0.25)
    df.loc[low, "event"] = 0
    case.write(df)
    summary = case.ok()
    q = case.table("quartiles").query("marker == 'faceage'")
    assert q.iloc[0]["events"] == 0 and q.iloc[1:]["hr"].isna().all()
    assert all("no events in Q1" in note for note in q["note"])
    assert_flagged(case, summary, "no_events_in_group")
    assert "no events in Q1" in (case.out / "report.md").read_text()


def test_twenty_patients_flags_events_per_term(case):
    df = cohort(n=20, seed=3, risk=False)
    df["event"] = [1, 0] * 10
    case.write(df)
    summary = case.ok()
    assert summary["n"] == 20
    assert_flagged(case, summary, "low_events_per_term")


def test_huge_outlier_is_flagged(case):
    df = cohort(risk=False)
    df.loc[17, "faceage"] = 1e6  # a failed prediction, or the wrong unit
    case.write(df)
    summary = case.ok()
    assert_flagged(case, summary, "outliers")
    assert "marker 'faceage'" in [f for f in summary["flags"] if f["check"] == "outliers"][0]["message"]


def test_hr_per_unit_beyond_floating_point_is_flagged(case):
    case.write(cohort(risk=False))
    summary = case.ok("markers.faceage.per=1e6")
    assert_flagged(case, summary, "hr_overflow")
    assert math.isnan(case.adjusted()["hr"])


def test_many_incomplete_rows_are_flagged(case):
    df = cohort(risk=False).astype({"faceage": object})
    df.loc[:79, "faceage"] = ""
    case.write(df)
    summary = case.ok()
    assert summary["dropped_incomplete"] == 80
    assert_flagged(case, summary, "many_rows_dropped")


def test_far_outside_bins_and_text_far(case):
    df = cohort(risk=False)
    df["far"] = np.random.default_rng(0).normal(1, 0.2, N).round(3)
    df["interval_bin"] = np.where(np.arange(N) % 10 == 0, 5000, 200)
    case.write(df)
    summary = case.ok("far.column=far", "far.bins=[10-365,366-730]")
    assert_flagged(case, summary, "far_outside_bins")
    far = case.table("far")
    assert far.loc[0, "n"] == 180 and far.loc[1, "note"] == "fewer than 10 events"
    df["far"] = df["far"].astype(object)
    df.loc[4, "far"] = "n/a?"
    case.write(df)
    assert "far.column='far' is not numeric" in case.error("far.column=far")


# ---------------------------------------------------------------- text that leaves fahr


def test_formula_cells_are_neutralised_and_numbers_stay_numbers(case):
    df = cohort(risk=False)
    df["-grade"] = np.random.default_rng(1).normal(size=N).round(3)
    df["stage"] = np.where(np.arange(N) % 3 == 0, "@SUM(A1)", "=1+1")  # the reference level is '=1+1'
    case.write(df)
    summary = case.ok("covariates=[age,sex,'-grade',stage]")
    terms = pd.read_csv(case.out / "model_terms.csv", dtype=str, keep_default_na=False)
    assert "'-grade" in set(terms["term"]) and "-grade" not in set(terms["term"])
    assert not any(cell.startswith(("=", "+", "@")) for cell in terms.to_numpy().ravel())
    assert any(cell.startswith("-") and float(cell) < 0 for cell in terms["coef"])  # numbers stay numbers
    report = (case.out / "report.md").read_text()
    assert "| '=1+1 |" in report and "| =1+1" not in report and "| -grade" not in report
    assert summary["covariates"][3]["reference"] == "=1+1"  # JSON keeps the data as it is


def test_markdown_in_levels_is_inert(case):
    df = cohort(risk=False)
    df["site"] = np.where(np.arange(N) % 2 == 0, "![x](http://evil.example/p.png)", "<img src=x>")
    case.write(df)
    case.ok("covariates=[age,site]")
    report = (case.out / "report.md").read_text()
    assert "](http://evil" not in report and "<img" not in report


def test_a_rerun_leaves_no_result_of_an_analysis_no_longer_asked_for(case):
    """Outputs of an earlier run (a marker's Kaplan-Meier figure, the FAR table) are removed when the
    new report does not include them, so every file in the folder belongs to the report."""
    df = cohort()
    case.write(df)
    case.ok()
    assert (case.out / "km_risk.png").is_file()
    (case.out / "far.csv").write_text("interval_bin,hr\n10-365,9.9\n")  # as an earlier FAR analysis left it
    (case.out / "notes.txt").write_text("mine")  # not fahr's: kept
    case.write(df.drop(columns="risk"))
    case.ok()
    names = sorted(p.name for p in case.out.iterdir())
    assert "km_risk.png" not in names and "far.csv" not in names and "km_faceage.png" in names
    assert "notes.txt" in names
