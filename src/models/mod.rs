//! The networks: OSNet (torchreid's layout) and PLR-OSNet built from its blocks, and PLR-OSNet's
//! training loss.

pub mod osnet;
pub mod plr_loss;
pub mod plr_osnet;

pub use osnet::{channels_for_width, Osnet, OsnetConfig, OsnetOutput};
pub use plr_loss::{PlrLoss, PlrLossConfig, PlrLossTerms, OFFICIAL_CENTER_CLASSES};
pub use plr_osnet::{PlrConfig, PlrOsnet, PlrTrainOutput};
