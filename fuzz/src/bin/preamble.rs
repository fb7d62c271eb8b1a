//! Fuzz target `preamble`: see [`runv_fuzz::preamble`].
#![cfg_attr(afl, no_main)]

runv_fuzz::target!(preamble);
