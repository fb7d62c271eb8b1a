//! Fuzz target `monitor`: see [`runv_fuzz::monitor`].
#![cfg_attr(afl, no_main)]

runv_fuzz::target!(monitor);
