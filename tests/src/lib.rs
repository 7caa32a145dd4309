//! placeholder until the test lab lands
