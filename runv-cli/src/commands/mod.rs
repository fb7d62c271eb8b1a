pub mod drivers;
pub mod features;
pub mod version;
