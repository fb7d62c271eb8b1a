//! Fuzz target `state`: see [`runv_fuzz::state`].
#![cfg_attr(afl, no_main)]

runv_fuzz::target!(state);
