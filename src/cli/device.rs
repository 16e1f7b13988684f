//! `--device cpu|cuda|auto`, shared by every command that runs the model.

use crate::error::{Error, Result};
use crate::tensor::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU is found, else the CPU.
    Auto,
}

/// The device to run on; says on stderr which one `auto` picked and why.
pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => match crate::cuda::probe() {
            Ok(()) => Ok(Device::Cuda),
            Err(why) => Err(Error::Cuda(format!("--device cuda: CUDA is not usable: {why}"))),
        },
        DeviceChoice::Auto => match crate::cuda::probe() {
            Ok(()) => {
                eprintln!("device: cuda (auto)");
                Ok(Device::Cuda)
            }
            Err(why) => {
                eprintln!("device: cpu (auto; CUDA not usable: {why})");
                Ok(Device::Cpu)
            }
        },
    }
}
