//! Config values that are one of a few names (`"v_prediction"`, `"trailing"`, ...), as enums:
//! the name is checked once when the config is read, an unknown one is an error naming the
//! key, and code matches on variants instead of strings.

/// Declares an enum read from and written as one of its names. An unknown name is an error
/// that names the config key and lists the names that are supported.
macro_rules! config_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident ($key:literal) { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order the config documents them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as the config writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "{} `{s}` is not supported (supported: {})",
                        $key,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

pub(crate) use config_enum;
