# misspelt_schedule_option.kt: an option of step with a typo
# expect: E206
graph misspelt_schedule_option
data digits { val_split = 300 }
train {
  epochs = 8
  schedule = step(milestone=[4, 6])
}
node a : cnn_tiny [target]
label -> a : through
