//! Tidal's worker: a candle-based model server.
