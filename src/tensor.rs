//! Tensors: a shape, an element type and a device-resident buffer shared by reference counting.
//!
//! Layout is always dense row-major (NCHW for images). Cloning a tensor is cheap (it shares the
//! buffer); writing through `storage_mut` copies first if the buffer is shared.

use std::sync::Arc;

use crate::cuda::CudaBuffer;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Element type of a tensor's storage. On the GPU a bf16 tensor holds 2-byte values; on the CPU it
/// holds f32 values that are exactly representable in bf16 (every op producing a bf16 tensor rounds
/// its f32 result once, to nearest even), so the CPU backend computes what the GPU does: bf16
/// storage, f32 arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        })
    }
}

/// `v` rounded to the nearest bf16 value (ties to even), as an f32; a NaN stays a NaN (quiet bit
/// set). Bit for bit `half::bf16::from_f32`, written without branches so that the rounding pass
/// over an op's output vectorises (half's branchy form made bf16 ops up to 2.5x slower).
pub fn round_bf16(v: f32) -> f32 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) & 0xFFFF_0000;
    let quiet_nan = (x | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if v.is_nan() { quiet_nan } else { rounded })
}

/// Where a tensor lives and where the ops on it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

pub enum Storage {
    Cpu(Vec<f32>),
    Cuda(CudaBuffer),
}

impl Storage {
    fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(_) => Device::Cuda,
        }
    }

    fn try_clone(&self) -> Result<Storage> {
        Ok(match self {
            Storage::Cpu(v) => Storage::Cpu(v.clone()),
            Storage::Cuda(b) => Storage::Cuda(b.try_clone()?),
        })
    }
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Arc<Storage>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.shape, self.dtype, self.device())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A CPU tensor holding `data` with the given shape.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape("Tensor::from_vec", format!("{} values do not fill shape {:?}", data.len(), shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Arc::new(Storage::Cpu(data)) })
    }

    /// Wraps an existing storage holding `dtype` values (on the CPU: f32 values already rounded
    /// to `dtype`).
    pub(crate) fn from_storage_dtype(storage: Storage, shape: &[usize], dtype: DType) -> Tensor {
        Tensor { shape: shape.to_vec(), dtype, storage: Arc::new(storage) }
    }

    pub fn zeros(shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, device)
    }

    pub fn ones(shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, device)
    }

    pub fn full(shape: &[usize], value: f32, device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value; numel(shape)], shape)?.to_device(device)
    }

    /// A one-element tensor of shape [1].
    pub fn scalar(value: f32, device: Device) -> Result<Tensor> {
        Tensor::full(&[1], value, device)
    }

    /// Normal(0, std) values on the CPU.
    pub fn randn(shape: &[usize], std: f32, rng: &mut Rng) -> Tensor {
        let data = (0..numel(shape)).map(|_| rng.normal() as f32 * std).collect();
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Arc::new(Storage::Cpu(data)) }
    }

    /// Uniform [lo, hi) values on the CPU.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut Rng) -> Tensor {
        let data = (0..numel(shape)).map(|_| rng.uniform_range(lo as f64, hi as f64) as f32).collect();
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Arc::new(Storage::Cpu(data)) }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Mutable access to the buffer, copying it first if another tensor shares it.
    pub fn storage_mut(&mut self) -> Result<&mut Storage> {
        if Arc::get_mut(&mut self.storage).is_none() {
            self.storage = Arc::new(self.storage.try_clone()?);
        }
        Ok(Arc::get_mut(&mut self.storage).expect("storage was just made unique"))
    }

    /// Whether two tensors share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// The values of a CPU tensor, or an error naming `op` if it lives elsewhere.
    pub fn cpu_slice(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => Err(Error::msg("cpu_slice: tensor lives on the GPU; copy it with to_device(Cpu)")),
        }
    }

    /// Mutable values of a CPU tensor (copy-on-write).
    pub fn cpu_slice_mut(&mut self) -> Result<&mut [f32]> {
        match self.storage_mut()? {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => Err(Error::msg("cpu_slice_mut: tensor lives on the GPU")),
        }
    }

    /// The values as f32, copied to the host.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match (&*self.storage, self.dtype) {
            (Storage::Cpu(v), _) => Ok(v.clone()),
            (Storage::Cuda(b), DType::F32) => b.to_host(),
            (Storage::Cuda(b), DType::BF16) => Ok(b.to_host_u16()?.into_iter().map(|u| half::bf16::from_bits(u).to_f32()).collect()),
        }
    }

    /// The tensor converted to `dtype` (the same tensor if it already is); f32 to bf16 rounds to
    /// nearest even.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype == dtype {
            return Ok(self.clone());
        }
        match &*self.storage {
            Storage::Cpu(v) => {
                let data = match dtype {
                    DType::BF16 => v.iter().map(|&x| round_bf16(x)).collect(),
                    // bf16 values are exact f32 values already.
                    DType::F32 => v.clone(),
                };
                Ok(Tensor { shape: self.shape.clone(), dtype, storage: Arc::new(Storage::Cpu(data)) })
            }
            Storage::Cuda(_) => crate::cuda::cast(self, dtype),
        }
    }

    /// An op's f32 result as `dtype`, the dtype of its activation inputs: f32 stays as it is, bf16
    /// rounds each element once (in place unless the buffer is shared). This is the CPU backend's
    /// "bf16 storage, f32 arithmetic": the op computed in f32 on bf16-valued inputs.
    pub(crate) fn rounded_to(mut self, dtype: DType) -> Result<Tensor> {
        if self.dtype == dtype {
            return Ok(self);
        }
        if self.dtype == DType::F32 && dtype == DType::BF16 && self.device() == Device::Cpu {
            use rayon::prelude::*;
            self.cpu_slice_mut()?.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = round_bf16(*v)));
            self.dtype = DType::BF16;
            return Ok(self);
        }
        self.to_dtype(dtype)
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape("item", format!("tensor of shape {:?} is not a scalar", self.shape)));
        }
        Ok(self.to_vec()?[0])
    }

    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match (&*self.storage, device) {
            (Storage::Cpu(v), Device::Cuda) => Storage::Cuda(match self.dtype {
                DType::F32 => CudaBuffer::from_host(v)?,
                DType::BF16 => CudaBuffer::from_host_u16(&v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<_>>())?,
            }),
            (Storage::Cuda(_), Device::Cpu) => Storage::Cpu(self.to_vec()?),
            _ => unreachable!("same-device case returned above"),
        };
        Ok(Tensor { shape: self.shape.clone(), dtype: self.dtype, storage: Arc::new(storage) })
    }

    /// The same buffer seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape("reshape", format!("cannot view shape {:?} ({} elements) as {:?}", self.shape, self.numel(), shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: self.storage.clone() })
    }

    /// The four dimensions of an NCHW tensor, or a shape error naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<(usize, usize, usize, usize)> {
        match self.shape[..] {
            [n, c, h, w] => Ok((n, c, h, w)),
            _ => Err(Error::shape(op, format!("expected an NCHW tensor, got shape {:?}", self.shape))),
        }
    }

    /// The two dimensions of a matrix, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::shape(op, format!("expected a 2-d tensor, got shape {:?}", self.shape))),
        }
    }

    /// Errors unless every tensor is f32 and on the same device as `self`; returns that device.
    pub fn check_same(&self, op: &'static str, others: &[&Tensor]) -> Result<Device> {
        let dev = self.check_same_dtype(op, others)?;
        if self.dtype != DType::F32 {
            return Err(Error::DType { op, dtype: self.dtype });
        }
        Ok(dev)
    }

    /// Errors unless every tensor of `f32_operands` is f32 and on `dev`: the operands that stay f32
    /// whatever the activation dtype (BatchNorm parameters and statistics, conv bias).
    pub fn check_f32_on(op: &'static str, dev: Device, f32_operands: &[&Tensor]) -> Result<()> {
        for t in f32_operands {
            if t.dtype != DType::F32 {
                return Err(Error::DTypeMismatch { op, a: DType::F32, b: t.dtype });
            }
            if t.device() != dev {
                return Err(Error::DeviceMismatch { op, a: dev, b: t.device() });
            }
        }
        Ok(())
    }

    /// Errors unless every tensor has `self`'s dtype (f32 or bf16) and device; returns the device.
    pub fn check_same_dtype(&self, op: &'static str, others: &[&Tensor]) -> Result<Device> {
        let dev = self.device();
        for t in others {
            if t.dtype != self.dtype {
                return Err(Error::DTypeMismatch { op, a: self.dtype, b: t.dtype });
            }
            if t.device() != dev {
                return Err(Error::DeviceMismatch { op, a: dev, b: t.device() });
            }
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_shares_and_write_copies() {
        let a = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let mut b = a.reshape(&[4]).unwrap();
        assert!(a.same_storage(&b));
        b.cpu_slice_mut().unwrap()[0] = 9.0;
        assert_eq!(a.to_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.to_vec().unwrap(), vec![9.0, 2.0, 3.0, 4.0]);
        assert!(a.reshape(&[3]).is_err());
        assert!(Tensor::from_vec(vec![1.0], &[2]).is_err());
    }

    #[test]
    fn round_bf16_is_bit_identical_to_half() {
        // Every 251st bit pattern (all exponents, signs, NaN payloads) and every pattern around
        // the rounding points of a few values (ties, one below, one above).
        let strided = (0..=u32::MAX / 251).map(|i| i * 251);
        let near_ties = [1.0f32, 1.5, -3.0, 65504.0, f32::MAX, f32::MIN_POSITIVE, 1e-40]
            .into_iter()
            .flat_map(|v| (0..=0x1_0000u32).map(move |d| v.to_bits().wrapping_add(d).wrapping_sub(0x8000)));
        for bits in strided.chain(near_ties) {
            let v = f32::from_bits(bits);
            let want = half::bf16::from_f32(v).to_f32();
            assert_eq!(round_bf16(v).to_bits(), want.to_bits(), "{bits:#010x}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_casts_back_exactly() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
        let halfway = 1.0 + 2f32.powi(-8);
        assert_eq!(round_bf16(halfway), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        assert!(round_bf16(f32::NAN).is_nan());
        let mut rng = Rng::new(3);
        let x = Tensor::randn(&[64], 3.0, &mut rng);
        let b = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        for (&v, &r) in x.cpu_slice().unwrap().iter().zip(b.cpu_slice().unwrap()) {
            assert!((v - r).abs() <= v.abs() * 2f32.powi(-8), "{v} -> {r}");
            assert_eq!(round_bf16(r), r);
        }
        let back = b.to_dtype(DType::F32).unwrap();
        assert_eq!(back.dtype(), DType::F32);
        assert_eq!(back.to_vec().unwrap(), b.to_vec().unwrap());
        assert!(matches!(x.check_same_dtype("t", &[&b]), Err(Error::DTypeMismatch { .. })));
        assert!(matches!(b.check_same("t", &[]), Err(Error::DType { .. })));
    }
}
