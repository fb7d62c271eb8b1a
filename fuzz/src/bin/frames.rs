//! Fuzz target `frames`: see [`runv_fuzz::frames`].
#![cfg_attr(afl, no_main)]

runv_fuzz::target!(frames);
