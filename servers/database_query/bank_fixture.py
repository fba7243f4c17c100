"""Build the target bank's SQLite database that the database_query tool reads.

Why generated and not committed: a binary database in git cannot be reviewed;
this script is the reviewable source, and its data is fixed (no randomness) so
every run, test and document agrees on the same guards, shifts and cameras.
Run ``python -m servers.database_query.bank_fixture --config config/heist.yaml`` to (re)build it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from heist_common.config import HeistConfig, load_config

DB_FILE = "bank.db"

SCHEMA = """
CREATE TABLE access_levels (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    vault_access INTEGER NOT NULL,
    after_hours INTEGER NOT NULL
);
CREATE TABLE employees (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    department TEXT NOT NULL,
    access_level_id INTEGER NOT NULL REFERENCES access_levels(id),
    badge_number TEXT NOT NULL UNIQUE,
    hire_date TEXT NOT NULL
);
CREATE TABLE guards (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    badge_number TEXT NOT NULL UNIQUE,
    post TEXT NOT NULL,
    shift_start TEXT NOT NULL,
    shift_end TEXT NOT NULL,
    armed INTEGER NOT NULL,
    years_of_service INTEGER NOT NULL
);
CREATE TABLE shifts (
    id INTEGER PRIMARY KEY,
    guard_id INTEGER NOT NULL REFERENCES guards(id),
    day_of_week TEXT NOT NULL,
    shift_start TEXT NOT NULL,
    shift_end TEXT NOT NULL,
    post TEXT NOT NULL
);
CREATE TABLE cameras (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL UNIQUE,
    location TEXT NOT NULL,
    level INTEGER NOT NULL,
    camera_type TEXT NOT NULL,
    sweep_seconds INTEGER NOT NULL,
    recording INTEGER NOT NULL
);
CREATE TABLE vaults (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    level INTEGER NOT NULL,
    door_model TEXT NOT NULL,
    time_lock_set TEXT NOT NULL,
    time_lock_open TEXT NOT NULL,
    deposit_boxes INTEGER NOT NULL,
    cash_amount INTEGER NOT NULL,
    access_level_id INTEGER NOT NULL REFERENCES access_levels(id)
);
"""

ACCESS_LEVELS = [
    (1, "public", "Public hall only", 0, 0),
    (2, "staff", "Ground floor and level -1 offices", 0, 0),
    (3, "operations", "Level -1 including the counting room", 0, 1),
    (4, "security", "Every floor, control room, no vault", 0, 1),
    (5, "vault_officer", "Vault antechamber and vault (dual control)", 1, 0),
    (6, "manager", "Everything, sets the time lock", 1, 1),
]

EMPLOYEES = [
    (1, "Helena Vasquez", "Branch manager", "Management", 6, "FM-1001", "2011-03-14"),
    (2, "Tobias Wren", "Assistant manager", "Management", 5, "FM-1002", "2015-09-01"),
    (3, "Priya Raman", "Vault officer", "Operations", 5, "FM-1003", "2017-06-19"),
    (4, "Marcus Oyelaran", "Head teller", "Retail", 3, "FM-1004", "2013-01-07"),
    (5, "Lena Fischer", "Teller", "Retail", 2, "FM-1005", "2020-02-03"),
    (6, "Diego Almeida", "Teller", "Retail", 2, "FM-1006", "2021-11-22"),
    (7, "Sophie Laurent", "Teller", "Retail", 2, "FM-1007", "2022-05-16"),
    (8, "Kwame Mensah", "Cash counter", "Operations", 3, "FM-1008", "2018-08-27"),
    (9, "Ingrid Solberg", "Cash counter", "Operations", 3, "FM-1009", "2019-04-08"),
    (10, "Raj Patel", "IT technician", "IT", 4, "FM-1010", "2016-10-10"),
    (11, "Mei Chen", "Loan officer", "Lending", 2, "FM-1011", "2014-12-01"),
    (12, "Oscar Brandt", "Loan officer", "Lending", 2, "FM-1012", "2023-01-09"),
    (13, "Amara Nwosu", "Compliance officer", "Compliance", 2, "FM-1013", "2019-07-15"),
    (14, "Felix Kowalski", "Facilities", "Facilities", 3, "FM-1014", "2012-05-21"),
    (15, "Nadia Haddad", "Receptionist", "Retail", 1, "FM-1015", "2024-03-04"),
    (16, "Elliot Marsh", "Security coordinator", "Security", 4, "FM-1016", "2010-09-13"),
]

GUARDS = [
    (1, "Bruno Castellano", "G-201", "control_room", "22:00", "06:00", 1, 12),
    (2, "Yusuf Demir", "G-202", "interior_rounds", "22:00", "06:00", 1, 4),
    (3, "Carla Jimenez", "G-203", "patrol_car", "22:00", "06:00", 1, 7),
    (4, "Pieter de Vries", "G-204", "control_room", "06:00", "14:00", 1, 9),
    (5, "Hana Sato", "G-205", "public_hall", "06:00", "14:00", 0, 2),
    (6, "Samuel Okafor", "G-206", "public_hall", "14:00", "22:00", 0, 3),
    (7, "Greta Lindqvist", "G-207", "control_room", "14:00", "22:00", 1, 15),
    (8, "Tomasz Nowak", "G-208", "interior_rounds", "22:00", "06:00", 1, 1),
]

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

CAMERAS = [
    (1, "CAM-H1", "Public hall, entrance", 0, "fixed", 0, 1),
    (2, "CAM-H2", "Public hall, teller line", 0, "fixed", 0, 1),
    (3, "CAM-H3", "Public hall, ATM lobby", 0, "dome", 20, 1),
    (4, "CAM-O1", "Manager's office door", 0, "fixed", 0, 1),
    (5, "CAM-S1", "Stairwell B, ground floor", 0, "fixed", 0, 1),
    (6, "CAM-D1", "Loading dock, Tanner Lane", 0, "pan_tilt", 45, 1),
    (7, "CAM-D2", "Loading dock roof", 1, "fixed", 0, 0),
    (8, "CAM-L1", "Level -1 corridor north", -1, "dome", 30, 1),
    (9, "CAM-L2", "Level -1 corridor south", -1, "fixed", 0, 1),
    (10, "CAM-C1", "Counting room", -1, "fixed", 0, 1),
    (11, "CAM-S2", "Stairwell B, level -2", -2, "fixed", 0, 1),
    (12, "CAM-V2", "Vault corridor, turn at 15 m", -2, "pan_tilt", 60, 1),
    (13, "CAM-V1", "Vault antechamber door", -2, "fixed", 0, 1),
    (14, "CAM-V3", "Vault interior", -2, "dome", 0, 1),
]

VAULTS = [
    (1, "Main vault", -2, "Halvorsen Model 9", "18:30", "07:45", 126, 1_840_000, 5),
    (2, "Cash counting safe", -1, "Brandt CS-200", "19:00", "07:30", 0, 240_000, 3),
    (3, "Night depository", 0, "Brandt ND-40", "none", "none", 0, 35_000, 4),
]


def shift_rows() -> list[tuple[int, int, str, str, str, str]]:
    """Weekly schedule: each guard works five days; Sunday nights have one interior guard."""
    rows = []
    next_id = 1
    for guard_id, _, _, post, start, end, _, _ in GUARDS:
        days_off = {DAYS[(guard_id * 2) % 7], DAYS[(guard_id * 2 + 1) % 7]}
        for day in DAYS:
            if day in days_off:
                continue
            if day == "Sun" and post == "interior_rounds" and guard_id != 2:
                continue
            rows.append((next_id, guard_id, day, start, end, post))
            next_id += 1
    return rows


def bank_db_path(config: HeistConfig) -> Path:
    """Return where the bank database lives: ``<run_dir>/data/bank.db``."""
    return config.mesh.data_dir / DB_FILE


def build(path: Path) -> None:
    """Write a fresh database at ``path`` (atomically: built aside, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".building")
    tmp.unlink(missing_ok=True)
    connection = sqlite3.connect(tmp)
    try:
        with connection:
            connection.executescript(SCHEMA)
            connection.executemany("INSERT INTO access_levels VALUES (?, ?, ?, ?, ?)", ACCESS_LEVELS)
            connection.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?, ?)", EMPLOYEES)
            connection.executemany("INSERT INTO guards VALUES (?, ?, ?, ?, ?, ?, ?, ?)", GUARDS)
            connection.executemany("INSERT INTO shifts VALUES (?, ?, ?, ?, ?, ?)", shift_rows())
            connection.executemany("INSERT INTO cameras VALUES (?, ?, ?, ?, ?, ?, ?)", CAMERAS)
            connection.executemany("INSERT INTO vaults VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", VAULTS)
    finally:
        connection.close()
    os.replace(tmp, path)


def ensure_bank_db(config: HeistConfig) -> Path:
    """Build the bank database unless it exists; return its path. Safe against concurrent first starts."""
    path = bank_db_path(config)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not path.exists():
            build(path)
    finally:
        os.close(lock_fd)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the bank database from scratch."""
    parser = argparse.ArgumentParser(
        prog="python -m servers.database_query.bank_fixture", description="(Re)build the bank database."
    )
    parser.add_argument("--config", default="config/heist.yaml")
    args = parser.parse_args(argv)
    path = bank_db_path(load_config(args.config))
    build(path)
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
