//! Conversions between the store's types and SQLite values.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::blob::Digest;
use crate::records::{StepState, Timestamp, TurnId, TurnState};

impl ToSql for TurnId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for TurnId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str()?.parse().map_err(other_error)
    }
}

impl ToSql for Digest {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_hex()))
    }
}

impl FromSql for Digest {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Digest::from_hex(value.as_str()?).map_err(other_error)
    }
}

impl ToSql for Timestamp {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.unix_ms()))
    }
}

impl FromSql for Timestamp {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(Timestamp::from_unix_ms(value.as_i64()?))
    }
}

impl ToSql for TurnState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for TurnState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        TurnState::parse(text).ok_or_else(|| unknown_state(text))
    }
}

impl ToSql for StepState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for StepState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        StepState::parse(text).ok_or_else(|| unknown_state(text))
    }
}

fn other_error(error: crate::StoreError) -> FromSqlError {
    FromSqlError::Other(Box::new(error))
}

fn unknown_state(text: &str) -> FromSqlError {
    FromSqlError::Other(format!("unknown state {text:?} in the store database").into())
}

/// Converts a size or count from SQLite's signed integers; the schema never stores negatives.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Converts a size for SQLite; sizes beyond `i64::MAX` bytes do not occur.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
