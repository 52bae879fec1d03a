//! Resource limits in a service spec: `[limits] memory = "64M"`, `cpu = 0.5`, `pids = 64`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What one service may use. Absent fields: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Bytes of memory (`"64M"`, `"1G"` or a number of bytes); the kernel kills the service
    /// beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// CPUs' worth of time (`0.5`: half of one CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// Limits a kernel can apply: at least 1 MiB of memory, at least 1% of a CPU, one process.
    pub fn check(&self) -> Result<(), String> {
        if let Some(m) = self.memory.filter(|m| m.0 < MIN_MEMORY) {
            return Err(format!(
                "limits.memory is {} bytes; at least 1M is needed to start anything",
                m.0
            ));
        }
        if let Some(c) = self.cpu.filter(|c| c.0 < 10 || c.0 > 1_024_000) {
            return Err(format!(
                "limits.cpu is {}; expected from 0.01 to 1024 CPUs",
                c.0 as f64 / 1000.0
            ));
        }
        if self.pids == Some(0) {
            return Err("limits.pids is 0; at least 1 is needed to start anything".into());
        }
        Ok(())
    }
}

const MIN_MEMORY: u64 = 1 << 20;

/// A memory limit in bytes; written `"64M"` or as a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory(pub u64);

impl Memory {
    /// `64M`, `1536K` or bytes: how a person would write it back.
    pub fn human(self) -> String {
        match self.0 {
            b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
            b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
            b if b % (1 << 10) == 0 => format!("{}K", b >> 10),
            b => b.to_string(),
        }
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.human())
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Memory, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Bytes(b) => Ok(Memory(b)),
            Written::Text(t) => crate::parse_size(&t)
                .map(Memory)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A CPU limit in thousandths of a CPU; written `0.5` or `2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu(pub u32);

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(f64::from(self.0) / 1000.0)
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cpu, D::Error> {
        let cpus = f64::deserialize(d)?;
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
            return Err(serde::de::Error::custom(format!(
                "cpu {cpus}: expected a number of CPUs from 0.01 to 1024"
            )));
        }
        Ok(Cpu((cpus * 1000.0).round() as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_as_people_write_them_and_checked() {
        let l: Limits =
            serde_json::from_str(r#"{"memory": "64M", "cpu": 0.5, "pids": 64}"#).unwrap();
        assert_eq!(l.memory, Some(Memory(64 << 20)));
        assert_eq!(l.cpu, Some(Cpu(500)));
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"memory":"64M","cpu":0.5,"pids":64}"#
        );
        assert!(l.check().is_ok());
        let tiny: Limits = serde_json::from_str(r#"{"memory": 4096}"#).unwrap();
        assert!(tiny.check().unwrap_err().contains("at least 1M"));
        assert!(serde_json::from_str::<Limits>(r#"{"cpu": -1}"#).is_err());
        assert!(serde_json::from_str::<Limits>(r#"{"memory": "64Q"}"#).is_err());
        assert!(serde_json::from_str::<Limits>(r#"{"disk": 1}"#).is_err());
        assert!(Limits::default().is_none());
    }
}
