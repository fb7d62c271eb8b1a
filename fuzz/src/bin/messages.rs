//! Fuzz target `messages`: see [`runv_fuzz::messages`].
#![cfg_attr(afl, no_main)]

runv_fuzz::target!(messages);
